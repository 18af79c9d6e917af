"""The benchmark registry: versioned definitions with a 'tiny' and a 'full' config each.

`evaluate(benchmark, checkpoint, dataset, config)` returns flat metrics named `<benchmark>/<metric>`
(`knn/top1_k20`, `linear/top1`, `det/bbox_AP`, `det/segm_AP`, `seg/mIoU`, ...), all in percent. `run(...)`
returns the same metrics with everything an evaluation record needs (benchmark version, config hash,
checkpoint sha256, timing). Bump a benchmark's version whenever its numbers would change for the same
checkpoint and config, so cached results of the old version are never reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from evaluator.backbones import Backbone, PixelFeatures, load_backbone, random_backbone
from evaluator.dense import DenseBackboneConfig
from evaluator.detection import DetectionConfig, evaluate_detection
from evaluator.features import FeatureCache, ImageTransform
from evaluator.knn import KnnConfig, run_knn
from evaluator.linear import LinearConfig, run_linear
from evaluator.segmentation import SegmentationConfig, evaluate_segmentation
from trainer.presets import ConfigError, format_validation_error

Baseline = Literal["random", "pixels"]
Subject = Backbone | PixelFeatures
DEFAULT_CACHE_DIR = Path("outputs/feature_cache")


@dataclass
class RunContext:
    """Where a run keeps its cache and whether it shows progress."""

    cache: FeatureCache = field(default_factory=lambda: FeatureCache(None))
    progress: bool = False


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


def config_hash(cfg: BaseModel) -> str:
    """sha256 of the canonical JSON of a benchmark config."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _check_key(model: type[BaseModel], path: list[str]) -> None:
    """Refuse an override path that names no config field (a typo must not pass silently)."""
    current: type[BaseModel] | None = model
    for depth, part in enumerate(path):
        if current is None or part not in current.model_fields:
            choices = f"; expected one of: {', '.join(sorted(current.model_fields))}" if current is not None else ""
            raise ConfigError(f"unknown config key {'.'.join(path[: depth + 1])!r}{choices}")
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def apply_overrides(cfg: BaseModel, overrides: Sequence[str]) -> BaseModel:
    """`a.b=value` overrides (YAML values) on a config; unknown keys and bad values raise ConfigError."""
    data = cfg.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        path = key.strip().split(".")
        _check_key(type(cfg), path)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node: dict[str, Any] = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    try:
        return type(cfg).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)[0]) from exc


@dataclass(frozen=True)
class Benchmark:
    """A versioned benchmark definition."""

    name: str
    version: str
    description: str
    config_type: type[BaseModel]
    presets: Mapping[str, BaseModel]
    runner: Callable[[Subject, Path, Any, RunContext], dict[str, float]]
    accepts_pixels: bool = False

    def config(self, config: str | BaseModel | Mapping[str, Any] = "tiny", overrides: Sequence[str] = ()) -> BaseModel:
        """A preset name ('tiny', 'full'), a config object or a dict, plus dotted overrides."""
        if isinstance(config, str):
            if config not in self.presets:
                raise ConfigError(f"{self.name}: no config named {config!r}; choose from {', '.join(self.presets)}")
            cfg = self.presets[config]
        elif isinstance(config, self.config_type):
            cfg = config
        elif isinstance(config, Mapping):
            try:
                cfg = self.config_type.model_validate(dict(config))
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc)[0]) from exc
        else:
            raise ConfigError(f"{self.name}: config must be a preset name, a {self.config_type.__name__} or a dict")
        return apply_overrides(cfg, overrides) if overrides else cfg

    def subject(self, checkpoint: Path | str | None, baseline: Baseline | None = None, seed: int = 0) -> Subject:
        """What is evaluated: the checkpoint, or a baseline (a random init of its shape, or raw pixels)."""
        if baseline == "pixels":
            if not self.accepts_pixels:
                raise ConfigError(f"{self.name}: the raw-pixel baseline exists for knn and linear only")
            return PixelFeatures()
        if checkpoint is None:
            raise ConfigError(f"{self.name}: a checkpoint is needed")
        if baseline == "random":
            return random_backbone(checkpoint, seed=seed)
        return load_backbone(checkpoint)

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
    ) -> EvalResult:
        """Evaluate and return the full record."""
        cfg = self.config(config, overrides)
        config_name = config if isinstance(config, str) else "custom"
        if overrides:
            config_name += "+overrides"
        start = time.perf_counter()
        subject = subject or self.subject(checkpoint, baseline, seed=int(getattr(cfg, "seed", 0)))
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


# ------------------------------------------------------------------------------------------ the presets
# full: the papers' protocols (spec section 3). tiny: the same code on 2 CPU cores in minutes, for the tiny
# trainer presets (32-px inputs, 4-px patches); its departures are deliberate and listed here:
#   knn/linear: 32-px resize/crop (the models' input size), seeded 10k/5k subsets of train/test, cached
#     centre-crop features (no augmentation), linear base_lr 0.1 (DINO's 1e-3 barely moves in 100 epochs);
#   det/seg: frozen backbone (a dense probe, no ViT backward), 96-px images, slim FPN/heads, 100 steps.

_TINY_TRANSFORM = ImageTransform(resize=32, crop=32)
_TINY_PROBE = {
    "transform": _TINY_TRANSFORM,
    "max_train_samples": 10000,
    "max_test_samples": 5000,
    "batch_size": 256,
    "num_workers": 0,
}

BENCHMARKS: dict[str, Benchmark] = {
    "knn": Benchmark(
        name="knn",
        version="1",
        description="weighted k-NN (DINO: cosine, T=0.07, k in 10/20/100/200) on frozen features",
        config_type=KnnConfig,
        presets={
            "tiny": KnnConfig(**_TINY_PROBE),
            "full": KnnConfig(batch_size=128, num_workers=10),
        },
        runner=_knn,
        accepts_pixels=True,
    ),
    "linear": Benchmark(
        name="linear",
        version="1",
        description="linear probe on frozen features (DINO: SGD, cosine lr, 100 epochs, last-4 [CLS] for ViT-S)",
        config_type=LinearConfig,
        presets={
            "tiny": LinearConfig(**_TINY_PROBE, epochs=100, train_batch_size=256, base_lr=0.1, train_augment=False),
            "full": LinearConfig(batch_size=128, num_workers=10),
        },
        runner=_linear,
        accepts_pixels=True,
    ),
    "det": Benchmark(
        name="det",
        version="1",
        description="Mask R-CNN + FPN on the ViT adapter (blocks 4/6/8/12 -> strides 4-32), COCOeval bbox/segm",
        config_type=DetectionConfig,
        presets={
            "tiny": DetectionConfig(
                backbone=DenseBackboneConfig(drop_path_rate=0.0, freeze=True),
                fpn_channels=64,
                box_head_dim=256,
                mask_head_channels=64,
                anchor_sizes=(16, 32, 64, 128, 256),
                train_min_sizes=(96,),
                test_min_size=96,
                max_size=96,
                crop_policy=False,
                rpn_batch_size=64,
                roi_batch_size=64,
                batch_size=2,
                max_iterations=100,
                lr=1e-3,
                warmup_iters=20,
                num_workers=0,
            ),
            "full": DetectionConfig(num_workers=4),
        },
        runner=_det,
    ),
    "seg": Benchmark(
        name="seg",
        version="1",
        description="Semantic FPN on blocks 3/6/9/12 (all at stride p), mIoU / mAcc / aAcc from a confusion matrix",
        config_type=SegmentationConfig,
        presets={
            "tiny": SegmentationConfig(
                backbone=DenseBackboneConfig(drop_path_rate=0.0, freeze=True),
                fpn_channels=64,
                head_channels=32,
                scale=(192, 96),
                crop_size=96,
                batch_size=4,
                iterations=100,
                lr=1e-3,
                warmup_iters=20,
                num_workers=0,
            ),
            "full": SegmentationConfig(num_workers=4),
        },
        runner=_seg,
    ),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def evaluate(
    benchmark: str,
    checkpoint: Path | str | None,
    dataset: Path | str,
    config: str | BaseModel | Mapping[str, Any] = "tiny",
    **kwargs: Any,
) -> dict[str, float]:
    """Flat metrics of one benchmark on one checkpoint and dataset (see Benchmark.run for the options)."""
    return get_benchmark(benchmark).evaluate(checkpoint, dataset, config, **kwargs)


def describe() -> list[dict[str, Any]]:
    """Name, version, description and config hashes of every benchmark (for a /benchmarks listing)."""
    return [
        {
            "name": b.name,
            "version": b.version,
            "description": b.description,
            "configs": {name: config_hash(cfg) for name, cfg in b.presets.items()},
        }
        for b in BENCHMARKS.values()
    ]


__all__ = ["BENCHMARKS", "Benchmark", "EvalResult", "apply_overrides", "describe", "evaluate", "get_benchmark"]
