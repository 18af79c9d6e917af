"""The YAML presets ship as package data: `configs/` is the source, `trainer/presets_data` what is installed."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer.presets import PRESETS_FOLDER, ConfigError, load_config, preset_dir, preset_names, resolve_preset


def test_every_preset_resolves_through_the_installed_package() -> None:
    packaged = files("trainer") / PRESETS_FOLDER
    assert isinstance(packaged, Path) and preset_dir() == packaged
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert names and preset_names() == names
    for name in names:
        path = resolve_preset(name)
        assert path.parent == packaged and path.read_bytes() == (REPO / "configs" / f"{name}.yaml").read_bytes()
        assert load_config(name) == load_config(REPO / "configs" / f"{name}.yaml")
    for source in (REPO / "configs").rglob("*.yaml"):  # subfolders (sweeps/) travel too
        relative = source.relative_to(REPO / "configs")
        assert (packaged / str(relative)).read_bytes() == source.read_bytes()


def test_a_yaml_path_still_works_and_unknown_names_list_the_presets(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("_base_: tiny_cpu\nseed: 7\n")  # extends a preset by name
    assert resolve_preset(mine) == mine and load_config(mine).seed == 7
    assert resolve_preset(REPO / "configs" / "tiny_cpu.yaml") == REPO / "configs" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match="tiny_cpu"):
        resolve_preset("tiny_gpu")
