"""Benchmark configs and the table of benchmarks, without torch: the service validates evaluations with these.

Importing this module loads pydantic, yaml and the trainer's config modules only (never torch, timm or
torchvision), so the REST API and the reconciler can resolve, validate and hash a benchmark config cheaply.
`evaluator.benchmarks` adds a runner to each entry of `BENCHMARKS`; nothing else lists the benchmarks.

Each benchmark has a `full` config (the papers' protocol, spec section 3) and a `tiny` one: the same code on
2 CPU cores in minutes, for the tiny trainer presets (32-px inputs, 4-px patches). The tiny departures are
deliberate:
  * knn/linear: 32-px resize/crop (the models' input size), seeded 10k/5k subsets of train/test, cached
    centre-crop features (no augmentation), linear base_lr 0.1 (DINO's 1e-3 barely moves in 100 epochs);
  * det/seg: frozen backbone (a dense probe, no ViT backward), 96-px images, slim FPN/heads, 100 steps;
  * dense_linear/knn_seg: 64-px centre crops, seeded 500/200-image subsets, 300 head steps, a 20k-patch bank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.presets import ConfigError, override_model, validate_model

Pool = Literal["auto", "cls", "ca", "avg"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
ConfigName = Literal["tiny", "full"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------ probes (k-NN, linear)


class FeatureSpec(_Config):
    """Which image-level feature a probe reads from the backbone."""

    pool: Pool = Field(
        "auto",
        description="cls = normed [CLS] (DINO variant); ca = SelfPatch aggregation token; avg = mean of patch "
        "tokens; auto = cls for DINO, ca for SelfPatch (avg when ca_head is not available).",
    )
    n_last_blocks: int | None = Field(
        None,
        ge=1,
        le=48,
        description="Concatenate the feature of the last n blocks; None = the probe's default (1, "
        "or the linear probe's cls_last_blocks for [CLS]).",
    )


class ImageTransform(_Config):
    """Test-time transform: resize the short side, centre-crop, normalise (DINO: 256 / 224, bicubic)."""

    resize: int = Field(256, ge=1, description="Short side after resizing.")
    crop: int = Field(224, ge=1, description="Centre-crop side (a multiple of the patch size).")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="Resize interpolation.")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class ProbeConfig(_Config):
    """What the k-NN and linear probes read: data, subsets, transform, feature choice."""

    feature: FeatureSpec = Field(default_factory=lambda: FeatureSpec(), description="Image feature to probe.")
    transform: ImageTransform = Field(default_factory=lambda: ImageTransform())
    train_split: str = Field("train", description="Labelled split the probe learns from.")
    test_split: str = Field("val", description="Split it is scored on (Fashion-MNIST: the test files).")
    max_train_samples: int | None = Field(None, ge=1, description="Seeded random subset of the train split.")
    max_test_samples: int | None = Field(None, ge=1, description="Seeded random subset of the test split.")
    batch_size: int = Field(256, ge=1, description="Images per forward pass while extracting.")
    num_workers: int = Field(2, ge=0, description="DataLoader workers while extracting.")
    device: Device = "auto"
    seed: int = Field(0, ge=0, description="Seeds the subsets and the probe.")


class KnnConfig(ProbeConfig):
    """DINO's k-NN protocol on frozen features (defaults: the full ImageNet setup)."""

    ks: tuple[int, ...] = Field((10, 20, 100, 200), description="Neighbour counts; all are reported.")
    temperature: float = Field(0.07, gt=0, description="Vote weight exp(sim / T).")


class LbfgsConfig(_Config):
    """Full-batch L-BFGS logistic regression on cached features (the CLIP / DINOv2-v3 protocol).

    The L2 strength is the one with the best top-1 on a seeded held-out part of the training features (never
    the test set); the probe is then refit on all training features with it. Objective: mean cross-entropy
    + l2 / 2 * ||W||^2 (bias not penalised), i.e. scikit-learn's C = 1 / (l2 * n_train).
    """

    l2_grid: tuple[float, ...] = Field(
        (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        min_length=1,
        description="L2 strengths tried on the held-out split (log-spaced; sklearn C = 1 / (l2 * n_train)).",
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of the training features held out.")
    max_iter: int = Field(100, ge=1, description="L-BFGS iterations per fit (scikit-learn's default 100).")
    tolerance_grad: float = Field(1e-5, gt=0, description="Stop a fit when every gradient entry is below this.")
    history_size: int = Field(10, ge=1, description="L-BFGS memory (curvature pairs; scipy's default 10).")
    standardize: bool = Field(
        True,
        description="Standardise each feature channel with the fitting set's statistics (folded into the "
        "classifier, so the penalty is scale-free across backbones).",
    )

    @field_validator("l2_grid")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not v > 0 for v in value):
            raise ValueError(f"every l2 strength must be > 0, got {list(value)}")
        return value


class LinearConfig(ProbeConfig):
    """DINO's linear protocol (defaults: ViT-S on ImageNet, 100 epochs, batch 1024 = 8 GPUs x 128)."""

    protocol: Literal["sgd", "lbfgs"] = Field(
        "sgd",
        description="sgd = DINO's probe (the papers' protocol); lbfgs = full-batch L-BFGS logistic regression "
        "on cached features with the L2 strength chosen on a held-out split (`lbfgs.*`).",
    )
    lbfgs: LbfgsConfig = Field(default_factory=lambda: LbfgsConfig(), description="Settings of protocol=lbfgs.")
    cls_last_blocks: int = Field(4, ge=1, description="DINO's n_last_blocks for ViT-S when the feature is [CLS].")
    epochs: int = Field(100, ge=1)
    train_batch_size: int = Field(1024, ge=1, description="Probe batch; lr = base_lr * batch / 256.")
    base_lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    train_augment: bool = Field(
        True,
        description="RandomResizedCrop + flip through the frozen backbone every epoch (DINO); false = cached "
        "centre-crop features (fast).",
    )
    eval_every: int = Field(1, ge=1, description="Score the test split every N epochs (top1_best).")

    @model_validator(mode="after")
    def _lbfgs_reads_the_cache(self) -> LinearConfig:
        if self.protocol == "lbfgs" and self.train_augment:
            raise ValueError("protocol=lbfgs fits cached centre-crop features: set train_augment=false")
        return self


# ------------------------------------------------------------------------------ dense tasks (det, seg)


class DenseBackboneConfig(_Config):
    out_indices: tuple[int, ...] | None = Field(
        None,
        description="0-based blocks feeding the neck; None = the paper's blocks for a 12-block ViT, evenly "
        "spaced blocks for other depths.",
    )
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0, description="Stochastic depth while fine-tuning.")
    freeze: bool = Field(False, description="Keep the backbone frozen (the papers fine-tune it end to end).")
    dino_cls_token: Literal["keep", "drop"] = Field(
        "keep",
        description="DINO backbones only: 'keep' runs the ViT as pretrained, with [CLS]; 'drop' removes [CLS] and "
        "its positional entry as SelfPatch's det/seg backbone does (spec 2.10.9).",
    )


class DetectionConfig(_Config):
    """Mask R-CNN fine-tuning and evaluation; defaults are the paper's full-scale setup."""

    backbone: DenseBackboneConfig = Field(default_factory=lambda: DenseBackboneConfig(drop_path_rate=0.05))
    strides: tuple[int, int, int, int] = Field((4, 8, 16, 32), description="Output strides of the adapter.")
    fpn_channels: int = Field(256, ge=8, description="FPN width.")
    box_head_dim: int = Field(1024, ge=8, description="Width of the two-layer box head.")
    mask_head_channels: int = Field(256, ge=8, description="Width of the 4-conv mask head.")
    anchor_sizes: tuple[int, int, int, int, int] = Field((32, 64, 128, 256, 512), description="One size per level.")
    train_min_sizes: tuple[int, ...] = Field(
        tuple(range(480, 801, 32)), description="Multi-scale training: short side drawn from these."
    )
    test_min_size: int = Field(800, ge=16, description="Short side at test time.")
    max_size: int = Field(1333, ge=16, description="Long side limit (train and test).")
    crop_policy: bool = Field(
        True,
        description="DETR-style second policy with p=0.5: resize to {400,500,600}, absolute random crop 384-600, "
        "then the multi-scale resize.",
    )
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    rpn_batch_size: int = Field(256, ge=1, description="Anchors sampled per image for the RPN loss.")
    roi_batch_size: int = Field(512, ge=1, description="RoIs sampled per image for the box/mask losses.")
    batch_size: int = Field(8, ge=1, description="Images per step (paper: 1 per GPU on 8 GPUs).")
    epochs: float = Field(12, gt=0, description="Training epochs (1x schedule).")
    max_iterations: int | None = Field(None, ge=1, description="Stop after this many steps (smoke runs).")
    lr: float = Field(5e-5, gt=0, description="AdamW lr (XCiT's 1e-4 halved with the per-GPU batch).")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    lr_steps: tuple[float, ...] = Field(
        (8 / 12, 11 / 12), description="Fractions of the schedule at which lr drops 10x (1x: epochs 8 and 11 of 12)."
    )
    warmup_iters: int = Field(1000, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    train_split: str = "train"
    val_split: str = "val"
    max_val_images: int | None = Field(None, ge=1, description="Score only the first N validation images.")
    per_class: bool = Field(True, description="Also report per-class AP.")
    num_workers: int = Field(2, ge=0)
    device: Device = "auto"
    precision: Precision = "auto"
    seed: int = 0


class SegmentationConfig(_Config):
    """Semantic FPN training and evaluation; defaults are the paper's 40k-iteration ADE20K setup."""

    backbone: DenseBackboneConfig = Field(default_factory=lambda: DenseBackboneConfig(drop_path_rate=0.1))
    fpn_channels: int = Field(256, ge=8)
    head_channels: int = Field(128, ge=8)
    feature_strides: tuple[int, int, int, int] = Field((4, 8, 16, 32), description="Strides FPNHead declares.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    scale: tuple[int, int] = Field(
        (2048, 512), description="(long, short) size limits of the rescale (train and test)."
    )
    ratio_range: tuple[float, float] = Field((0.5, 2.0), description="Training rescale ratio range.")
    crop_size: int = Field(512, ge=8, description="Training crop side (a multiple of the patch size).")
    cat_max_ratio: float = Field(0.75, gt=0.0, le=1.0, description="Retry crops in which one class exceeds this share.")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    photometric: bool = Field(True, description="mmseg's PhotoMetricDistortion.")
    batch_size: int = Field(16, ge=1, description="Images per step (samples_per_gpu=4; 4 GPUs assumed).")
    iterations: int = Field(40000, ge=1)
    lr: float = Field(6e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    poly_power: float = Field(1.0, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_iters: int = Field(1500, ge=0)
    warmup_ratio: float = Field(1e-6, gt=0, le=1)
    train_split: str = "train"
    val_split: str = "val"
    max_val_images: int | None = Field(None, ge=1, description="Score only the first N validation images.")
    num_workers: int = Field(2, ge=0)
    device: Device = "auto"
    precision: Precision = "auto"
    seed: int = 0


# ------------------------------------------------------------------ patch-level probes (dense_linear, knn_seg)


class PatchProbeConfig(_Config):
    """What both patch-level probes read: data, subsets, geometry and the cached per-patch features.

    Images and label maps are resized (short side) and centre-cropped alike, so every image gives the same
    patch grid and the features of a split cache as one tensor; scores are computed at the crop resolution.
    """

    transform: ImageTransform = Field(
        default_factory=lambda: ImageTransform(resize=448, crop=448, interpolation="bilinear"),
        description="Resize the short side, centre-crop (a multiple of the patch size); labels follow (nearest).",
    )
    n_last_blocks: int = Field(
        1, ge=1, le=48, description="Concatenate the (normed) patch tokens of the last n blocks; 1 = last block."
    )
    pixel_patch_size: int = Field(
        16, ge=1, description="Patch side of the raw-pixel baseline (use the compared backbones' patch size)."
    )
    feature_dtype: Literal["float32", "float16"] = Field(
        "float16", description="Storage type of cached patch features (float16 halves a full-size cache)."
    )
    labels: Literal["classes", "foreground"] = Field(
        "classes",
        description="'classes': the data set's classes (the protocol); 'foreground': class 0 against all others "
        "merged, which asks whether patches separate objects from their scene when too few labelled images "
        "exist to name the objects.",
    )
    train_split: str = "train"
    val_split: str = "val"
    max_train_images: int | None = Field(None, ge=1, description="Seeded random subset of the train split.")
    max_val_images: int | None = Field(None, ge=1, description="Seeded random subset of the val split.")
    batch_size: int = Field(32, ge=1, description="Images per forward pass while extracting.")
    num_workers: int = Field(2, ge=0, description="DataLoader workers while extracting.")
    device: Device = "auto"
    seed: int = Field(0, ge=0, description="Seeds the subsets, the head and the bank subsampling.")


class DenseLinearConfig(PatchProbeConfig):
    """Linear per-patch classifier on frozen patch features, DINOv2-style (defaults: ViT-S/16 on ADE20K)."""

    standardize: bool = Field(
        True, description="Standardise each feature channel with train-set statistics (a fixed BatchNorm)."
    )
    iterations: int = Field(40000, ge=1, description="Optimiser steps.")
    train_batch_size: int = Field(16, ge=1, description="Images (all their patches) per step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    poly_power: float = Field(1.0, gt=0, description="Poly decay to 0 after the warm-up (1.0 = linear).")
    warmup_iters: int = Field(1500, ge=0)
    warmup_ratio: float = Field(1e-6, gt=0, le=1)


class KnnSegConfig(PatchProbeConfig):
    """k-NN segmentation: each val patch takes the exp(sim/T)-weighted vote of its k nearest train patches."""

    k: int = Field(20, ge=1, description="Neighbours per validation patch.")
    temperature: float = Field(0.07, gt=0, description="Vote weight exp(sim / T), as in the k-NN probe.")
    max_ignore_fraction: float = Field(
        0.5, ge=0.0, lt=1.0, description="Train patches with a larger share of ignore pixels stay out of the bank."
    )
    max_bank_patches: int | None = Field(
        1_000_000, ge=1, description="Seeded random subset of the train patches when the bank is larger."
    )
    query_chunk: int = Field(512, ge=1, description="Validation patches per similarity block (memory only).")


# ------------------------------------------------------------------------------------------ the table


def config_hash(cfg: BaseModel) -> str:
    """sha256 of the canonical JSON of a benchmark config."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class BenchmarkSpec:
    """A versioned benchmark definition: what it measures, its config type and its named configs.

    Bump `version` whenever the numbers would change for the same checkpoint and config, so stored results
    of the old version are never reused.
    """

    name: str
    version: str
    description: str
    config_type: type[BaseModel]
    presets: Mapping[str, BaseModel]
    accepts_pixels: bool = False
    data: str = ""  # the dataset layout it reads, for help texts
    feature_cache: bool = False  # frozen features are cached by checkpoint sha256 + dataset + transform
    # the paper's ViT-S/16 numbers (300 ImageNet-1k epochs, the `full` config), shown beside ours: metric -> method
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def config(self, config: str | BaseModel | Mapping[str, Any] = "tiny", overrides: Sequence[str] = ()) -> BaseModel:
        """A preset name ('tiny', 'full'), a config object or a dict, plus dotted `key=value` overrides.

        Raises ConfigError (with `.field` naming the dotted field when one is to blame).
        """
        if isinstance(config, str):
            if config not in self.presets:
                raise ConfigError(f"{self.name}: no config named {config!r}; choose from {', '.join(self.presets)}")
            cfg = self.presets[config]
        elif isinstance(config, self.config_type):
            cfg = config
        elif isinstance(config, Mapping):
            cfg = validate_model(self.config_type, config)
        else:
            raise ConfigError(f"{self.name}: config must be a preset name, a {self.config_type.__name__} or a dict")
        return override_model(cfg, overrides) if overrides else cfg

    def describe(self) -> dict[str, Any]:
        """Name, version, description and the hash of every named config (a /benchmarks listing entry)."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "configs": {name: config_hash(cfg) for name, cfg in self.presets.items()},
        }


_TINY_PROBE: dict[str, Any] = {
    "transform": ImageTransform(resize=32, crop=32),
    "max_train_samples": 10000,
    "max_test_samples": 5000,
    "batch_size": 256,
    "num_workers": 0,
}
_PROBE_DATA = "Fashion-MNIST idx folder, or an ImageNet-style root with train/ and val/ class folders"
_SEG_DATA = "ADE20K-layout root: images/<split>/ + annotations/<split>/ (+ meta.json or objectInfo150.csv)"
_TINY_PATCH_PROBE: dict[str, Any] = {
    "transform": ImageTransform(resize=64, crop=64, interpolation="bilinear"),
    "pixel_patch_size": 4,
    "feature_dtype": "float32",
    "max_train_images": 500,
    "max_val_images": 200,
    "batch_size": 64,
    "num_workers": 0,
}

#: Every benchmark, once: `evaluator.benchmarks` pairs each entry with the code that runs it.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "knn": BenchmarkSpec(
        name="knn",
        version="1",
        description="weighted k-NN (DINO: cosine, T=0.07, k in 10/20/100/200) on frozen features",
        config_type=KnnConfig,
        presets={
            "tiny": KnnConfig(**_TINY_PROBE),
            "full": KnnConfig(batch_size=128, num_workers=10),
        },
        accepts_pixels=True,
        feature_cache=True,
        data=_PROBE_DATA,
    ),
    "linear": BenchmarkSpec(
        name="linear",
        version="2",  # 2: `protocol` (sgd | lbfgs); an lbfgs result reports its chosen l2 instead of top1_best
        description="linear probe on frozen features (DINO: SGD, cosine lr, 100 epochs, last-4 [CLS] for ViT-S; "
        "or protocol=lbfgs: L-BFGS logistic regression, L2 chosen on held-out train features)",
        config_type=LinearConfig,
        presets={
            "tiny": LinearConfig(**_TINY_PROBE, epochs=100, train_batch_size=256, base_lr=0.1, train_augment=False),
            "full": LinearConfig(batch_size=128, num_workers=10),
        },
        accepts_pixels=True,
        feature_cache=True,
        data=_PROBE_DATA,
    ),
    "det": BenchmarkSpec(
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
        paper={"bbox_AP": {"dino": 40.8, "selfpatch": 42.1}, "segm_AP": {"dino": 37.3, "selfpatch": 38.5}},
        data="COCO-layout root: annotations/instances_<split>.json + <split>/ or images/<split>/",
    ),
    "seg": BenchmarkSpec(
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
        paper={"mIoU": {"dino": 38.3, "selfpatch": 41.2}},
        data=_SEG_DATA,
    ),
    "dense_linear": BenchmarkSpec(
        name="dense_linear",
        version="1",
        description="linear per-patch classifier on frozen last-block patch tokens, upsampled logits, mIoU",
        config_type=DenseLinearConfig,
        presets={
            "tiny": DenseLinearConfig(
                **_TINY_PATCH_PROBE, iterations=300, train_batch_size=8, lr=3e-2, warmup_iters=20
            ),
            "full": DenseLinearConfig(),
        },
        accepts_pixels=True,
        feature_cache=True,
        data=_SEG_DATA,
    ),
    "knn_seg": BenchmarkSpec(
        name="knn_seg",
        version="1",
        description="k-NN segmentation: cosine vote (T=0.07) of the k nearest train patches, mIoU",
        config_type=KnnSegConfig,
        presets={
            "tiny": KnnSegConfig(**_TINY_PATCH_PROBE, max_bank_patches=20_000, query_chunk=1024),
            "full": KnnSegConfig(),
        },
        accepts_pixels=True,
        feature_cache=True,
        data=_SEG_DATA,
    ),
}

if TYPE_CHECKING:
    BenchmarkName = str
else:  # derived from the table, so pydantic validates the names and the JSON schema lists them
    BenchmarkName = Literal[tuple(BENCHMARKS)]


def get_spec(name: str) -> BenchmarkSpec:
    """The benchmark called `name`; ConfigError naming the choices otherwise."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", field="benchmark")
    return BENCHMARKS[name]


def describe() -> list[dict[str, Any]]:
    """Name, version, description and config hashes of every benchmark (for a /benchmarks listing)."""
    return [spec.describe() for spec in BENCHMARKS.values()]


__all__ = [
    "BENCHMARKS",
    "BenchmarkName",
    "BenchmarkSpec",
    "ConfigError",
    "ConfigName",
    "DenseBackboneConfig",
    "DenseLinearConfig",
    "DetectionConfig",
    "FeatureSpec",
    "ImageTransform",
    "KnnConfig",
    "KnnSegConfig",
    "LbfgsConfig",
    "LinearConfig",
    "PatchProbeConfig",
    "ProbeConfig",
    "SegmentationConfig",
    "config_hash",
    "describe",
    "get_spec",
]
