"""Config validation, presets, dotted overrides and the config hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.presets import ConfigError, apply_overrides, load_config, preset_names, validate_config


def test_every_preset_validates() -> None:
    assert {"selfpatch_vits16", "dino_vits16", "tiny_cpu"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), TrainConfig)


def test_paper_presets_hold_the_official_recipes() -> None:
    sp = load_config("selfpatch_vits16")
    assert (sp.method, sp.model.arch, sp.model.patch_size) == ("selfpatch", "vit_small", 16)
    assert (sp.selfpatch.k, sp.selfpatch.window, sp.selfpatch.border, sp.selfpatch.num_blocks) == (4, 3, "wrap", 2)
    assert (sp.selfpatch.out_dim, sp.selfpatch.loss_weight, sp.head.out_dim) == (4096, 0.1, 65536)
    assert sp.crops.global_scale == (0.25, 1.0) and sp.crops.local_scale == (0.05, 0.25)
    assert sp.optim.batch_size_per_gpu * 8 == 1024
    dino = load_config("dino_vits16")
    assert dino.method == "dino" and dino.crops.global_scale == (0.4, 1.0) and dino.crops.local_scale == (0.05, 0.4)


def test_switching_the_method_changes_only_the_selfpatch_part_of_the_hash_input() -> None:
    sp = load_config("selfpatch_vits16")
    dino = load_config("selfpatch_vits16", ["method=dino"])
    a, b = sp.hashed_dict(), dino.hashed_dict()
    assert {k for k in a if a[k] != b[k]} == {"method"}
    assert sp.config_hash() != dino.config_hash()


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config("tiny_cpu", ["selfpatch.k=2", "crops.global_scale=[0.4, 1.0]", "logging.mlflow=false"])
    assert cfg.selfpatch.k == 2 and cfg.crops.global_scale == (0.4, 1.0) and cfg.logging.mlflow is False


def test_hash_ignores_where_results_go_but_not_what_is_computed() -> None:
    base = load_config("tiny_cpu")
    moved = load_config("tiny_cpu", ["checkpoint.output_dir=/elsewhere", "data.num_workers=7", "logging.log_every=3"])
    assert base.config_hash() == moved.config_hash()
    assert base.config_hash() != load_config("tiny_cpu", ["seed=1"]).config_hash()
    assert len(base.config_hash()) == 64
    elsewhere = load_config("tiny_cpu", ["data.path=/clone-b/data/fashion-mnist"])  # another clone, same science
    assert elsewhere.config_hash() == base.config_hash() and elsewhere.data.path != base.data.path


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["selfpatch.k=9"], "selfpatch.k", "cannot exceed the 8 neighbours"),
        (["selfpatch.k=0"], "selfpatch.k", "greater than or equal to 1"),
        (["selfpatch.window=4"], "selfpatch.window", "must be odd"),
        (
            ["crops.global_size=30"],
            "crops.global_size",
            "crops.global_size (30) must be a multiple of model.patch_size (4)",
        ),
        (["crops.local_scale=[0.5, 0.1]"], "crops.local_scale", "0 < low <= high <= 1"),
        (["optim.lr=-1"], "optim.lr", "greater than 0"),
        (["optim.epochs=abc"], "optim.epochs", "valid integer"),
        (["model.arch=vit_huge"], "model.arch", "vit_tiny"),
        (["crops.local_size=8"], "crops.local_size", "border 'wrap' needs"),
        (["optim.warmup_epochs=500"], "optim.warmup_epochs", "exceeds optim.epochs (3)"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", overrides)
    assert info.value.field == field
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_refused_with_their_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'selfpatch\.kk'") as info:
        apply_overrides({}, ["selfpatch.kk=3"])
    assert info.value.field == "selfpatch.kk"
    with pytest.raises(ConfigError, match="typo: Extra inputs are not permitted") as info:
        validate_config({"typo": 1})
    assert info.value.field == "typo"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["selfpatch.k"])


def test_valid_border_accepts_grids_smaller_than_the_window() -> None:
    cfg = load_config("tiny_cpu", ["crops.local_size=8", "selfpatch.border=valid"])
    assert cfg.crops.local_size == 8


def test_arch_names_shapes_and_timm_names_come_from_one_table() -> None:
    from trainer.config import ARCHS, ModelConfig, arch_for_width

    assert ModelConfig.model_json_schema()["properties"]["arch"]["enum"] == list(ARCHS)
    assert ARCHS["vit_small"].timm_name == "vit_small_patch16_224" and arch_for_width(384) == "vit_small"
    assert arch_for_width(32) is None
    for name, spec in ARCHS.items():
        assert ModelConfig(arch=name).dims == (spec.width, spec.depth, spec.heads)


def test_presets_are_parsed_once_but_edits_and_callers_never_see_stale_or_shared_data(tmp_path: Path) -> None:
    import os

    from trainer import presets

    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 0.001\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base\nmethod: dino\n")
    first = presets.read_yaml(child)
    assert first == {"optim": {"lr": 0.001}, "method": "dino"}
    first["optim"]["lr"] = 99.0  # a caller's edit stays its own
    parsed = len(presets._PARSED)
    assert presets.read_yaml(child) == {"optim": {"lr": 0.001}, "method": "dino"}
    assert len(presets._PARSED) == parsed  # the second read parsed nothing
    base.write_text("optim:\n  lr: 0.5\n")
    stat = base.stat()
    os.utime(base, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # an edit within the same clock tick
    assert presets.read_yaml(child)["optim"]["lr"] == 0.5
