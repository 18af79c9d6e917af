"""`evaluator.config`: torch-free benchmark configs, one table of benchmarks, one override parser."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, ValidationError

from evaluator.config import BENCHMARKS, BenchmarkName, config_hash, describe, get_spec
from tests.conftest import REPO
from trainer.config import TrainConfig
from trainer.presets import ConfigError, apply_overrides


def test_importing_the_configs_loads_no_torch() -> None:
    code = (
        "import sys, evaluator.config as c; c.get_spec('det').config('full', ['lr=1e-4']); "
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_runnable_benchmarks_are_the_table() -> None:
    from evaluator.benchmarks import BENCHMARKS as RUNNABLE
    from evaluator.benchmarks import RUNNERS, get_benchmark

    assert list(RUNNABLE) == list(BENCHMARKS) == list(RUNNERS)
    for name, spec in BENCHMARKS.items():
        bench = get_benchmark(name)
        assert bench.spec is spec and (bench.name, bench.version, bench.presets) == (name, spec.version, spec.presets)
        assert set(spec.presets) == {"tiny", "full"} and spec.data
    assert describe() == [spec.describe() for spec in BENCHMARKS.values()]
    assert describe()[0]["configs"]["tiny"] == config_hash(get_spec("knn").config("tiny"))


def test_benchmark_names_come_from_the_table_and_validate() -> None:
    class Request(BaseModel):
        benchmark: BenchmarkName

    assert Request.model_json_schema()["properties"]["benchmark"]["enum"] == list(BENCHMARKS)
    assert Request(benchmark="seg").benchmark == "seg"
    with pytest.raises(ValidationError):
        Request(benchmark="linear_probe")
    with pytest.raises(
        ConfigError, match="unknown benchmark 'knnn'; choose from knn, linear, det, seg, dense_linear, knn_seg"
    ) as info:
        get_spec("knnn")
    assert info.value.field == "benchmark"


def test_configs_from_names_dicts_and_overrides_name_the_field_to_blame() -> None:
    spec = get_spec("linear")
    tiny = spec.config("tiny")
    assert spec.config(tiny) is tiny
    changed = spec.config({"epochs": 3, "feature": {"pool": "avg"}}, ["transform.crop=28"])
    assert (changed.epochs, changed.feature.pool, changed.transform.crop) == (3, "avg", 28)  # type: ignore[attr-defined]
    for config, overrides, field in [
        ("tiny", ["feature.pool=mean"], "feature.pool"),
        ("tiny", ["feature.poool=avg"], "feature.poool"),
        ({"epochs": 0}, [], "epochs"),
        ("full", ["transform.crop=-1"], "transform.crop"),
    ]:
        with pytest.raises(ConfigError) as info:
            spec.config(config, overrides)
        assert info.value.field == field, (config, overrides, str(info.value))
    with pytest.raises(ConfigError, match="no config named 'huge'"):
        spec.config("huge")
    assert get_spec("det").config("tiny", ["backbone.freeze=false"]).backbone.freeze is False  # type: ignore[attr-defined]


def test_trainer_and_evaluator_parse_override_values_identically() -> None:
    class Probe(BaseModel):
        a: object = None

    values = {"a=off": "off", "a=[1,2]": [1, 2], "a=": None, "a=true": True, "a=0.5": 0.5, "a=x y": "x y"}
    for item, expected in values.items():
        assert apply_overrides({}, [item], Probe) == {"a": expected}, item
        train = apply_overrides({}, [item.replace("a=", "logging.run_name=")])  # the trainer's model (default)
        assert train == {"logging": {"run_name": expected}}, item
    # the evaluator's configs go through the same parser: 'off' is the string, which the bool field then reads
    assert get_spec("linear").config("tiny", ["train_augment=off"]).train_augment is False  # type: ignore[attr-defined]
    assert get_spec("knn").config("tiny", ["train_split=off"]).train_split == "off"  # type: ignore[attr-defined]
    assert TrainConfig.model_validate(apply_overrides({}, ["logging.progress=off"])).logging.progress == "off"
