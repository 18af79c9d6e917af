"""The run configuration: one set of pydantic models shared by the trainer, the CLI and the REST API.

Defaults follow the official SelfPatch code (`main_selfpatch.py`, which inherits DINO's defaults);
the paper recipes live in `configs/*.yaml`. Every option that departs from the official code says so
in its description and defaults to the faithful behaviour.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Method = Literal["dino", "selfpatch"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ArchSpec:
    """One named ViT: its shape and the timm registry model whose defaults an export is rebuilt from."""

    width: int
    depth: int
    heads: int
    timm_name: str


#: The named ViTs (DINO's `vit_tiny`, `vit_small`, `vit_base`): the only place their shapes and names are spelled.
ARCHS: dict[str, ArchSpec] = {
    "vit_tiny": ArchSpec(192, 12, 3, "vit_tiny_patch16_224"),
    "vit_small": ArchSpec(384, 12, 6, "vit_small_patch16_224"),
    "vit_base": ArchSpec(768, 12, 12, "vit_base_patch16_224"),
}

if TYPE_CHECKING:
    ArchName = str
else:  # derived from the table, so pydantic validates the names and the JSON schema lists them
    ArchName = Literal[tuple(ARCHS)]


def arch_for_width(width: int) -> str | None:
    """The named ViT of this width, if any (checkpoints without a config of ours are matched by width)."""
    return next((name for name, spec in ARCHS.items() if spec.width == width), None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: ArchName = Field("vit_small", description="ViT size (DINO names). SelfPatch's README trains vit_small.")
    patch_size: int = Field(16, ge=1, le=64, description="Patch side in pixels (16 or 8 in the papers).")
    img_size: int | None = Field(
        None, ge=8, description="Image side the positional embedding is learned for; default: crops.global_size."
    )
    embed_dim: int | None = Field(None, ge=8, description="Override the arch's width (tiny CPU presets).")
    depth: int | None = Field(None, ge=1, le=48, description="Override the arch's number of blocks.")
    num_heads: int | None = Field(None, ge=1, description="Override the arch's number of attention heads.")
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0, description="Stochastic depth of the student (teacher: 0).")
    pos_embed_interp: Literal["dino", "timm"] = Field(
        "dino",
        description="Positional-embedding resize for other crop sizes: 'dino' = bicubic with the +0.1 offset "
        "(official); 'timm' = timm's antialiased resample (deviation).",
    )

    @property
    def dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads) after overrides."""
        spec = ARCHS[self.arch]
        return (self.embed_dim or spec.width, self.depth or spec.depth, self.num_heads or spec.heads)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        width, _, heads = self.dims
        if width % heads:
            raise ValueError(f"model.embed_dim ({width}) must be a multiple of model.num_heads ({heads})")
        return self


class HeadConfig(_Section):
    out_dim: int = Field(65536, ge=2, description="Output size K of the image-level (DINO) head.")
    hidden_dim: int = Field(2048, ge=1, description="Hidden width of the projection MLPs.")
    bottleneck_dim: int = Field(256, ge=1, description="Bottleneck width before the weight-normed last layer.")
    nlayers: int = Field(3, ge=1, le=8, description="Linear layers in the MLP before the bottleneck.")
    norm_last_layer: bool = Field(
        True, description="Freeze the weight-norm gain of the last layer (cosine layer). Official default: true."
    )


class SelfPatchConfig(_Section):
    k: int = Field(4, ge=1, description="Positives per patch: the top-k most similar neighbours (--k_num).")
    window: int = Field(3, ge=3, le=15, description="Neighbourhood window side (official: 3, hard-coded).")
    border: Literal["wrap", "valid"] = Field(
        "wrap",
        description="'wrap': neighbours wrap around the grid like the official code (torus); "
        "'valid': only in-grid neighbours, the rest masked (deviation).",
    )
    num_blocks: int = Field(2, ge=1, le=8, description="Class-attention blocks in the aggregation module.")
    out_dim: int = Field(4096, ge=2, description="Output size of the patch head (--out_dim_selfpatch).")
    loss_weight: float = Field(0.1, ge=0.0, description="lambda in L = L_cls + lambda * L_patch (official: 0.1).")
    teacher_all_crops: bool = Field(
        True,
        description="Teacher runs on all crops, its local-crop outputs feed both centers and the patch loss "
        "(official). false: teacher on the global crops only, as in DINO (deviation).",
    )

    @field_validator("window")
    @classmethod
    def _odd_window(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"selfpatch.window must be odd, got {value}")
        return value

    @model_validator(mode="after")
    def _k_fits_window(self) -> SelfPatchConfig:
        if self.k > self.window**2 - 1:
            raise ValueError(
                f"selfpatch.k ({self.k}) cannot exceed the {self.window**2 - 1} neighbours of a "
                f"{self.window}x{self.window} window"
            )
        return self


class CropsConfig(_Section):
    global_size: int = Field(224, ge=8, description="Side of the 2 global crops.")
    global_scale: tuple[float, float] = Field(
        (0.25, 1.0), description="RandomResizedCrop scale of global crops (SelfPatch: 0.25-1; DINO: 0.4-1)."
    )
    local_number: int = Field(8, ge=0, le=32, description="Number of local crops (0 disables multi-crop).")
    local_size: int = Field(96, ge=8, description="Side of the local crops.")
    local_scale: tuple[float, float] = Field(
        (0.05, 0.25), description="RandomResizedCrop scale of local crops (SelfPatch: 0.05-0.25; DINO: 0.05-0.4)."
    )

    blur_radius: tuple[float, float] = Field(
        (0.1, 2.0),
        description="Gaussian-blur radius range in pixels (official: 0.1-2.0, set for 224-px crops). Smaller "
        "crops may scale it down (deviation).",
    )

    @field_validator("blur_radius")
    @classmethod
    def _radius_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] <= value[1]:
            raise ValueError(f"crops.blur_radius must satisfy 0 <= low <= high, got {list(value)}")
        return value

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crops.{info.field_name} must satisfy 0 < low <= high <= 1, got {list(value)}")
        return value

    @property
    def count(self) -> int:
        return 2 + self.local_number


class LossConfig(_Section):
    student_temp: float = Field(0.1, gt=0.0, description="Student softmax temperature.")
    teacher_temp: float = Field(0.04, gt=0.0, le=1.0, description="Teacher temperature after warm-up.")
    warmup_teacher_temp: float = Field(0.04, gt=0.0, le=1.0, description="Teacher temperature at epoch 0.")
    warmup_teacher_temp_epochs: int = Field(0, ge=0, description="Epochs of linear teacher-temperature warm-up.")
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of both centers.")


class OptimConfig(_Section):
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW for ViTs (official default).")
    epochs: int = Field(100, ge=1, description="Training epochs; every schedule spans them.")
    batch_size_per_gpu: int = Field(64, ge=1, description="Images per process and step.")
    lr: float = Field(5e-4, gt=0.0, description="Peak lr for a total batch of 256; scaled linearly.")
    min_lr: float = Field(1e-6, ge=0.0, description="Final lr of the cosine schedule.")
    warmup_epochs: int = Field(10, ge=0, description="Epochs of linear lr warm-up from 0.")
    weight_decay: float = Field(0.04, ge=0.0, description="Initial weight decay (cosine schedule).")
    weight_decay_end: float = Field(0.4, ge=0.0, description="Final weight decay.")
    clip_grad: float = Field(3.0, ge=0.0, description="Per-tensor gradient-norm clip; 0 disables.")
    freeze_last_layer: int = Field(1, ge=0, description="Epochs during which the heads' last layers get no update.")
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0, description="Base EMA momentum (cosine to 1).")

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"optim.warmup_epochs ({self.warmup_epochs}) exceeds optim.epochs ({self.epochs})")
        return self


class DataConfig(_Section):
    dataset: Literal["imagefolder", "fashion_mnist"] = Field(
        "imagefolder", description="'imagefolder': ImageNet layout (class folders); 'fashion_mnist': idx files."
    )
    path: Path = Field(Path("data/imagenet/train"), description="Dataset root.")
    split: Literal["train", "test"] = Field("train", description="Fashion-MNIST split (ignored for imagefolder).")
    max_samples: int | None = Field(None, ge=1, description="Use only the first N images (quick runs).")
    num_workers: int = Field(4, ge=0, description="DataLoader worker processes per training process.")


class CheckpointConfig(_Section):
    output_dir: Path = Field(Path("outputs/run"), description="Checkpoints, logs and exports go here.")
    saveckp_freq: int = Field(10, ge=0, description="Keep checkpointNNNN.pth every N epochs; 0 disables.")
    every_n_steps: int | None = Field(
        None, ge=1, description="Also refresh checkpoint.pth every N steps (long epochs on preemptible nodes)."
    )
    resume: bool = Field(True, description="Resume automatically from output_dir/checkpoint.pth if present.")


class LoggingConfig(_Section):
    mlflow: bool = Field(True, description="Log params, metrics and artifacts to MLflow (rank 0).")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a local folder ./mlruns."
    )
    experiment: str = Field("selfpatch", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; default <method>-<arch>-ep<E>-s<seed>.")
    run_id: str | None = Field(None, description="Continue this MLflow run (requeued attempts).")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow tags.")
    log_every: int = Field(10, ge=1, description="Log step metrics every N steps.")
    progress: Literal["auto", "on", "off"] = Field("auto", description="Progress bar: auto = when on a terminal.")


#: Fields that say where and how to observe a run, not what is computed: left out of the config hash.
UNHASHED_FIELDS: frozenset[str] = frozenset({"checkpoint", "logging", "data.num_workers", "stop_at_step", "device"})


class TrainConfig(_Section):
    """A complete, validated pretraining run."""

    method: Method = Field("selfpatch", description="'dino' or 'selfpatch' (DINO + SelfPatch patch loss).")
    seed: int = Field(0, ge=0, description="Seeds model init, sampling, augmentation and stochastic depth.")
    precision: Precision = Field(
        "auto", description="auto = fp16 with GradScaler on CUDA (official use_fp16), fp32 on CPU; bf16 anywhere."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    stop_at_step: int | None = Field(
        None, ge=1, description="Checkpoint and stop after this global step, as a preemption would."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    selfpatch: SelfPatchConfig = Field(default_factory=SelfPatchConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("crops")
    @classmethod
    def _crops_fit_patches(cls, crops: CropsConfig, info: ValidationInfo) -> CropsConfig:
        model = info.data.get("model")
        if model is None:
            return crops
        patch = model.patch_size
        for name in ("global_size", "local_size"):
            size = getattr(crops, name)
            if size % patch:
                raise ValueError(f"crops.{name} ({size}) must be a multiple of model.patch_size ({patch})")
        selfpatch = info.data.get("selfpatch")
        if info.data.get("method") == "selfpatch" and selfpatch is not None and selfpatch.border == "wrap":
            names = ["global_size"] + (["local_size"] if crops.local_number else [])
            for name in names:
                side = getattr(crops, name) // patch
                if side < selfpatch.window:
                    raise ValueError(
                        f"crops.{name} ({getattr(crops, name)}) gives a {side}x{side} patch grid, smaller than the "
                        f"selfpatch.window ({selfpatch.window}) that border 'wrap' needs; use selfpatch.border=valid"
                    )
        return crops

    @field_validator("optim")
    @classmethod
    def _teacher_temp_warmup_fits(cls, optim: OptimConfig, info: ValidationInfo) -> OptimConfig:
        loss = info.data.get("loss")
        if loss is not None and loss.warmup_teacher_temp_epochs > optim.epochs:
            raise ValueError(
                f"loss.warmup_teacher_temp_epochs ({loss.warmup_teacher_temp_epochs}) exceeds "
                f"optim.epochs ({optim.epochs})"
            )
        return optim

    @property
    def img_size(self) -> int:
        return self.model.img_size or self.crops.global_size

    def default_run_name(self) -> str:
        return f"{self.method}-{self.model.arch}{self.model.patch_size}-ep{self.optim.epochs}-s{self.seed}"

    def hashed_dict(self) -> dict[str, Any]:
        """The part of the config that determines the numbers (see UNHASHED_FIELDS)."""
        data = self.model_dump(mode="json")
        for dotted in UNHASHED_FIELDS:
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node[key]
            node.pop(leaf, None)
        return data

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of `hashed_dict()`: equal hashes mean the same experiment."""
        canonical = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
