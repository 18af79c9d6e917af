"""The runnable benchmarks: each entry of `evaluator.config.BENCHMARKS` paired with the code that runs it.

`evaluate(benchmark, checkpoint, dataset, config)` returns flat metrics named `<benchmark>/<metric>`
(`knn/top1_k20`, `linear/top1`, `det/bbox_AP`, `det/segm_AP`, `seg/mIoU`, `dense_linear/mIoU`, `knn_seg/mIoU`,
...), all in percent. `run(...)` returns the same metrics with everything an evaluation record needs (benchmark
version, config hash, checkpoint sha256, timing). Names, versions and configs live in `evaluator.config`
(torch-free); this module only adds the runners.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from evaluator.backbones import Backbone, PixelFeatures, load_backbone, random_backbone
from evaluator.config import BENCHMARKS as SPECS
from evaluator.config import BenchmarkSpec, config_hash, describe, get_spec
from evaluator.dense_probe import run_dense_linear, run_knn_seg
from evaluator.detection import evaluate_detection
from evaluator.features import FeatureCache
from evaluator.knn import run_knn
from evaluator.linear import run_linear
from evaluator.segmentation import evaluate_segmentation
from trainer.presets import ConfigError
from trainer.presets import override_model as apply_overrides

Baseline = Literal["random", "pixels"]
Subject = Backbone | PixelFeatures
DEFAULT_CACHE_DIR = Path("outputs/feature_cache")


@dataclass
class RunContext:
    """Where a run keeps its cache and whether it shows progress."""

    cache: FeatureCache = field(default_factory=lambda: FeatureCache(None))
    progress: bool = False


Runner = Callable[[Subject, Path, Any, RunContext], dict[str, float]]


def _knn(subject: Subject, root: Path, cfg: Any, ctx: RunContext) -> dict[str, float]:
    return run_knn(subject, root, cfg, ctx.cache, ctx.progress)


def _linear(subject: Subject, root: Path, cfg: Any, ctx: RunContext) -> dict[str, float]:
    return run_linear(subject, root, cfg, ctx.cache, ctx.progress)


def _det(subject: Subject, root: Path, cfg: Any, ctx: RunContext) -> dict[str, float]:
    assert isinstance(subject, Backbone)
    return evaluate_detection(subject, root, cfg, ctx.progress)


def _seg(subject: Subject, root: Path, cfg: Any, ctx: RunContext) -> dict[str, float]:
    assert isinstance(subject, Backbone)
    return evaluate_segmentation(subject, root, cfg, ctx.progress)


def _dense_linear(subject: Subject, root: Path, cfg: Any, ctx: RunContext) -> dict[str, float]:
    return run_dense_linear(subject, root, cfg, ctx.cache, ctx.progress)


def _knn_seg(subject: Subject, root: Path, cfg: Any, ctx: RunContext) -> dict[str, float]:
    return run_knn_seg(subject, root, cfg, ctx.cache, ctx.progress)


#: The code behind each benchmark of the table (keyed by the table's names, nothing more).
RUNNERS: dict[str, Runner] = {
    "knn": _knn,
    "linear": _linear,
    "det": _det,
    "seg": _seg,
    "dense_linear": _dense_linear,
    "knn_seg": _knn_seg,
}


class EvalResult(BaseModel):
    """One evaluation: identity (checkpoint sha256, benchmark + version, config hash) and its metrics."""

    model_config = ConfigDict(frozen=True)

    benchmark: str
    version: str
    config_name: str
    config_hash: str
    config: dict[str, Any]
    checkpoint: str
    checkpoint_sha256: str
    baseline: str | None
    dataset: str
    metrics: dict[str, float]
    seconds: float
    finished_at: str


@dataclass(frozen=True)
class Benchmark:
    """A benchmark of the table (`spec`: name, version, configs) with the code that runs it."""

    spec: BenchmarkSpec
    runner: Runner

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def config_type(self) -> type[BaseModel]:
        return self.spec.config_type

    @property
    def presets(self) -> Mapping[str, BaseModel]:
        return self.spec.presets

    @property
    def accepts_pixels(self) -> bool:
        return self.spec.accepts_pixels

    def config(self, config: str | BaseModel | Mapping[str, Any] = "tiny", overrides: Sequence[str] = ()) -> BaseModel:
        """A preset name ('tiny', 'full'), a config object or a dict, plus dotted overrides (see BenchmarkSpec)."""
        return self.spec.config(config, overrides)

    def subject(
        self,
        checkpoint: Path | str | None,
        baseline: Baseline | None = None,
        seed: int = 0,
        *,
        num_heads: int | None = None,
    ) -> Subject:
        """What is evaluated: the checkpoint, or a baseline (a random init of its shape, or raw pixels).

        `num_heads` is for checkpoints without a config of ours whose width names no known ViT.
        """
        if baseline == "pixels":
            if not self.accepts_pixels:
                raise ConfigError(f"{self.name}: the raw-pixel baseline exists for the probes only")
            return PixelFeatures()
        if checkpoint is None:
            raise ConfigError(f"{self.name}: a checkpoint is needed")
        if baseline == "random":
            return random_backbone(checkpoint, seed=seed, num_heads=num_heads)
        return load_backbone(checkpoint, num_heads=num_heads)

    def run(
        self,
        checkpoint: Path | str | None,
        dataset: Path | str,
        config: str | BaseModel | Mapping[str, Any] = "tiny",
        *,
        overrides: Sequence[str] = (),
        baseline: Baseline | None = None,
        cache_dir: Path | str | None = None,
        progress: bool = False,
        subject: Subject | None = None,
        num_heads: int | None = None,
    ) -> EvalResult:
        """Evaluate and return the full record."""
        cfg = self.config(config, overrides)
        config_name = config if isinstance(config, str) else "custom"
        if overrides:
            config_name += "+overrides"
        start = time.perf_counter()
        seed = int(getattr(cfg, "seed", 0))
        subject = subject or self.subject(checkpoint, baseline, seed=seed, num_heads=num_heads)
        ctx = RunContext(FeatureCache(cache_dir), progress)
        raw = self.runner(subject, Path(dataset), cfg, ctx)
        metrics = {f"{self.name}/{k}": float(v) for k, v in raw.items()}
        identity = subject.identity
        return EvalResult(
            benchmark=self.name,
            version=self.version,
            config_name=config_name,
            config_hash=config_hash(cfg),
            config=cfg.model_dump(mode="json"),
            checkpoint=str(checkpoint) if checkpoint is not None else "",
            checkpoint_sha256=identity.split("|")[0],
            baseline=baseline,
            dataset=str(dataset),
            metrics=metrics,
            seconds=time.perf_counter() - start,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

    def evaluate(
        self,
        checkpoint: Path | str | None,
        dataset: Path | str,
        config: str | BaseModel | Mapping[str, Any] = "tiny",
        **kwargs: Any,
    ) -> dict[str, float]:
        """Flat metrics `<name>/<metric>` of one evaluation."""
        return self.run(checkpoint, dataset, config, **kwargs).metrics


BENCHMARKS: dict[str, Benchmark] = {name: Benchmark(spec, RUNNERS[name]) for name, spec in SPECS.items()}


def get_benchmark(name: str) -> Benchmark:
    """The runnable benchmark called `name`; ConfigError naming the choices otherwise."""
    return BENCHMARKS[get_spec(name).name]


def evaluate(
    benchmark: str,
    checkpoint: Path | str | None,
    dataset: Path | str,
    config: str | BaseModel | Mapping[str, Any] = "tiny",
    **kwargs: Any,
) -> dict[str, float]:
    """Flat metrics of one benchmark on one checkpoint and dataset (see Benchmark.run for the options)."""
    return get_benchmark(benchmark).evaluate(checkpoint, dataset, config, **kwargs)


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "EvalResult",
    "apply_overrides",
    "config_hash",
    "describe",
    "evaluate",
    "get_benchmark",
]
