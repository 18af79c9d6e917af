"""The run configuration: one set of pydantic models shared by the trainer, the CLI and the REST API.

Defaults follow the official SelfPatch code (`main_selfpatch.py`, which inherits DINO's defaults);
the paper recipes live in `configs/*.yaml`. Every option that departs from the official code says so
in its description and defaults to the faithful behaviour.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

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


def _json_integer(value: Any) -> Any:
    """What JSON Schema calls an integer: 3 or 3.0, never true, "3" or 3.5 (validation is strict otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a valid integer")
        return int(value)
    return value


#: An integer as JSON Schema means it (the config is validated strictly, which would refuse 3.0).
Integer = Annotated[int, Field(strict=False), BeforeValidator(_json_integer)]

#: Text with no control characters (no NUL, no newline): what a value may hold that reaches a log line,
#: an MLflow tag or a path. Shared with the service's boundary types.
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"
OneLine = Annotated[str, StringConstraints(max_length=1000, pattern=ONE_LINE)]
PathText = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=ONE_LINE)]


def strict_keys(schema: dict[str, Any]) -> None:
    """JSON schema of a dict with constrained keys: pydantic states the key pattern as `patternProperties`,
    which lets other keys through; say it as `propertyNames`, so the schema refuses what validation refuses."""
    patterns = schema.pop("patternProperties", None)
    if patterns and len(patterns) == 1:
        ((pattern, values),) = patterns.items()
        schema["propertyNames"] = {**schema.get("propertyNames", {}), "pattern": pattern}
        schema["additionalProperties"] = values


def _printable_path(value: Path) -> Path:
    text = str(value)
    if len(text) > 4096 or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError("a path must be at most 4096 characters with no control characters")
    return value


class _Section(BaseModel):
    """Every section: unknown keys refused, assignments validated, no NaN or infinity, no coercion (`"2"` is
    not an int, `false` is not 0: JSON, YAML and overrides already give native types; tuples and paths,
    which they give as lists and strings, say `strict=False`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class ModelConfig(_Section):
    arch: ArchName = Field("vit_small", description="ViT size (DINO names). SelfPatch's README trains vit_small.")
    patch_size: Integer = Field(16, ge=1, le=64, description="Patch side in pixels (16 or 8 in the papers).")
    img_size: Integer | None = Field(
        None,
        ge=8,
        le=4096,
        description="Image side the positional embedding is learned for; default: crops.global_size.",
    )
    embed_dim: Integer | None = Field(None, ge=8, le=8192, description="Override the arch's width (tiny CPU presets).")
    depth: Integer | None = Field(None, ge=1, le=48, description="Override the arch's number of blocks.")
    num_heads: Integer | None = Field(None, ge=1, le=128, description="Override the arch's number of attention heads.")
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0, description="Stochastic depth of the student (teacher: 0).")
    pos_embed_interp: Literal["dino", "timm"] = Field(
        "dino",
        description="Positional-embedding resize for other crop sizes: 'dino' = bicubic with the +0.1 offset "
        "(official); 'timm' = timm's antialiased resample (deviation).",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute the student's ViT blocks during the backward instead of keeping their activations: "
        "less memory for larger models or batches, about one more block forward of compute. Same numbers "
        "(stochastic depth is replayed); official: off.",
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
    out_dim: Integer = Field(65536, ge=2, le=262_144, description="Output size K of the image-level (DINO) head.")
    hidden_dim: Integer = Field(2048, ge=1, le=65_536, description="Hidden width of the projection MLPs.")
    bottleneck_dim: Integer = Field(
        256, ge=1, le=65_536, description="Bottleneck width before the weight-normed last layer."
    )
    nlayers: Integer = Field(3, ge=1, le=8, description="Linear layers in the MLP before the bottleneck.")
    norm_last_layer: bool = Field(
        True, description="Freeze the weight-norm gain of the last layer (cosine layer). Official default: true."
    )


class SelfPatchConfig(_Section):
    k: Integer = Field(4, ge=1, le=224, description="Positives per patch: the top-k most similar neighbours (--k_num).")
    window: Integer = Field(3, ge=3, le=15, description="Neighbourhood window side (official: 3, hard-coded).")
    border: Literal["wrap", "valid"] = Field(
        "wrap",
        description="'wrap': neighbours wrap around the grid like the official code (torus); "
        "'valid': only in-grid neighbours, the rest masked (deviation).",
    )
    num_blocks: Integer = Field(2, ge=1, le=8, description="Class-attention blocks in the aggregation module.")
    out_dim: Integer = Field(4096, ge=2, le=262_144, description="Output size of the patch head (--out_dim_selfpatch).")
    loss_weight: float = Field(
        0.1, ge=0.0, le=1000.0, description="lambda in L = L_cls + lambda * L_patch (official: 0.1)."
    )
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
    global_size: Integer = Field(224, ge=8, le=4096, description="Side of the 2 global crops.")
    global_scale: tuple[float, float] = Field(
        (0.25, 1.0),
        strict=False,
        description="RandomResizedCrop scale of global crops (SelfPatch: 0.25-1; DINO: 0.4-1).",
    )
    local_number: Integer = Field(8, ge=0, le=32, description="Number of local crops (0 disables multi-crop).")
    local_size: Integer = Field(96, ge=8, le=4096, description="Side of the local crops.")
    local_scale: tuple[float, float] = Field(
        (0.05, 0.25),
        strict=False,
        description="RandomResizedCrop scale of local crops (SelfPatch: 0.05-0.25; DINO: 0.05-0.4).",
    )

    blur_radius: tuple[float, float] = Field(
        (0.1, 2.0),
        strict=False,
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
    student_temp: float = Field(0.1, gt=0.0, le=100.0, description="Student softmax temperature.")
    teacher_temp: float = Field(0.04, gt=0.0, le=1.0, description="Teacher temperature after warm-up.")
    warmup_teacher_temp: float = Field(0.04, gt=0.0, le=1.0, description="Teacher temperature at epoch 0.")
    warmup_teacher_temp_epochs: Integer = Field(
        0, ge=0, le=100_000, description="Epochs of linear teacher-temperature warm-up."
    )
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of both centers.")


class OptimConfig(_Section):
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW for ViTs (official default).")
    epochs: Integer = Field(100, ge=1, le=100_000, description="Training epochs; every schedule spans them.")
    batch_size_per_gpu: Integer = Field(64, ge=1, le=65_536, description="Images per process and step.")
    lr: float = Field(5e-4, gt=0.0, le=100.0, description="Peak lr for a total batch of 256; scaled linearly.")
    min_lr: float = Field(1e-6, ge=0.0, le=100.0, description="Final lr of the cosine schedule.")
    warmup_epochs: Integer = Field(10, ge=0, le=100_000, description="Epochs of linear lr warm-up from 0.")
    weight_decay: float = Field(0.04, ge=0.0, le=100.0, description="Initial weight decay (cosine schedule).")
    weight_decay_end: float = Field(0.4, ge=0.0, le=100.0, description="Final weight decay.")
    clip_grad: float = Field(3.0, ge=0.0, le=1e6, description="Per-tensor gradient-norm clip; 0 disables.")
    freeze_last_layer: Integer = Field(
        1, ge=0, le=100_000, description="Epochs during which the heads' last layers get no update."
    )
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0, description="Base EMA momentum (cosine to 1).")
    fused: Literal["auto", "fused", "foreach", "off"] = Field(
        "auto",
        description="Optimizer kernels: 'fused' (one kernel for all tensors; skips a step on the device), 'foreach' "
        "(vectorised), 'off' (a loop over tensors, torch's CPU default); auto = fused where the device has it. "
        "All compute the official update, equal to fp32 rounding.",
    )
    finite_check: Literal["deferred", "step"] = Field(
        "deferred",
        description="A NaN/inf loss is never applied and stops the run with NonFiniteLossError (official). "
        "'deferred': the check stays on the device, that step and all later ones are masked out (optimizer, "
        "teacher EMA, centers) and the run stops at the next log step, checkpoint or stop, so nothing after the "
        "last finite step is logged or saved; 'step': a host check before every update (one sync per step). "
        "'deferred' needs an optimizer that can skip on the device (fused, or fp16's GradScaler), else it is 'step'.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"optim.warmup_epochs ({self.warmup_epochs}) exceeds optim.epochs ({self.epochs})")
        return self


#: The multi-crop pipelines (trainer/data/augment.py builds each).
AugmentBackend = Literal["pil", "tensor", "device"]


class DataConfig(_Section):
    dataset: Literal["imagefolder", "fashion_mnist"] = Field(
        "imagefolder", description="'imagefolder': ImageNet layout (class folders); 'fashion_mnist': idx files."
    )
    path: Path = Field(Path("data/imagenet/train"), strict=False, description="Dataset root.")

    @field_validator("path")
    @classmethod
    def _printable(cls, value: Path) -> Path:
        return _printable_path(value)

    split: Literal["train", "test"] = Field("train", description="Fashion-MNIST split (ignored for imagefolder).")
    max_samples: Integer | None = Field(None, ge=1, le=10**10, description="Use only the first N images (quick runs).")
    num_workers: Integer = Field(4, ge=0, le=256, description="DataLoader worker processes per training process.")
    augment_backend: AugmentBackend = Field(
        "pil",
        description="Multi-crop pipeline. 'pil' (faithful default): PIL decode and the official PIL transforms; "
        "'tensor': torchvision.io decode and transforms.v2 on uint8 tensors (blur stays PIL's), the same "
        "recipe with different random draws; 'device': the loader decodes, crops and flips, the colour "
        "jitter, grey-scale, blur, solarisation and normalisation run per batch on the training device "
        "(about 4.8x the images per loader core of 'pil'; for GPU trainers).",
    )


class CheckpointConfig(_Section):
    output_dir: Path = Field(Path("outputs/run"), strict=False, description="Checkpoints, logs and exports go here.")

    @field_validator("output_dir")
    @classmethod
    def _printable(cls, value: Path) -> Path:
        return _printable_path(value)

    saveckp_freq: Integer = Field(
        10, ge=0, le=100_000, description="Keep checkpointNNNN.pth every N epochs; 0 disables."
    )
    every_n_steps: Integer | None = Field(
        None,
        ge=1,
        le=10**12,
        description="Also refresh checkpoint.pth every N steps (long epochs on preemptible nodes).",
    )
    resume: bool = Field(True, description="Resume automatically from output_dir/checkpoint.pth if present.")


class LoggingConfig(_Section):
    mlflow: bool = Field(True, description="Log params, metrics and artifacts to MLflow (rank 0).")
    tracking_uri: PathText | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a local folder ./mlruns."
    )
    experiment: Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=ONE_LINE)] = Field(
        "selfpatch", description="MLflow experiment name."
    )
    run_name: Annotated[str, StringConstraints(max_length=250, pattern=ONE_LINE)] | None = Field(
        None, description="MLflow run name; default <method>-<arch>-ep<E>-s<seed>."
    )
    run_id: Annotated[str, StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9_\-]*$")] | None = Field(
        None, description="Continue this MLflow run (requeued attempts)."
    )
    tags: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=ONE_LINE)],
        Annotated[str, StringConstraints(max_length=5000, pattern=ONE_LINE)],
    ] = Field(
        default_factory=dict,
        max_length=100,
        description="Extra MLflow tags (MLflow's own size limits).",
        json_schema_extra=strict_keys,
    )
    export_artifacts: bool = Field(
        True,
        description="Log the final export (weights, aggregation module, manifest) as MLflow artifacts under export/ "
        "(false: only its manifest); checkpoints stay in the run folder, listed in checkpoints.json.",
    )
    register_model: bool = Field(
        True,
        description="Register the final backbone in the MLflow Model Registry as a version of "
        "'<experiment>-<method>' (needs export_artifacts).",
    )
    log_every: Integer = Field(10, ge=1, le=10**6, description="Log step metrics every N steps.")
    progress: Literal["auto", "on", "off"] = Field("auto", description="Progress bar: auto = when on a terminal.")


class CollapseConfig(_Section):
    """DINO's collapse diagnostics (logged as `diag/...` every `logging.log_every` steps) and when a run counts
    as collapsed: its teacher stays near-uniform or near one-hot for `windows` checks in a row."""

    uniform_ratio: float = Field(
        0.97, gt=0.0, le=1.0, description="Collapsed to uniform when H(P_t) > this x ln K (teacher entropy)."
    )
    onehot_ratio: float = Field(
        0.05, ge=0.0, lt=1.0, description="Collapsed to one-hot when H(mean P_t) < this x ln K (batch-mean entropy)."
    )
    after: float = Field(
        0.2, ge=0.0, le=1.0, description="Fraction of training before checking (a random teacher starts near-uniform)."
    )
    windows: Integer = Field(3, ge=1, le=10_000, description="Consecutive log steps the condition must hold.")
    stop: bool = Field(
        False, description="Stop a collapsed run (checkpoint, then fail with the reason); default: only flag it."
    )


class DistributedConfig(_Section):
    """How the student is spread over processes (one per GPU); a single process ignores it."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="'ddp': every process holds the whole student, gradients all-reduced (official). 'fsdp': "
        "FSDP2 (fully_shard per ViT block, then the whole student): parameters, gradients and optimizer state "
        "sharded over processes, for models that do not fit one GPU; the same update to fp32 rounding.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free the gathered parameters after each block's forward (least memory) rather than "
        "keeping them for the backward (one all-gather fewer per block).",
    )


#: Fields that say where and how to observe a run, not what is computed: left out of the config hash. The
#: dataset's path is where it lives, not what it is: the same preset hashes the same in every clone and on
#: every cluster (the path is recorded with the config, beside the hash).
#: Kernel choices (compile, fused optimizer, when the finite check runs) compute the same numbers to fp32
#: rounding, like the device: they are left out too, as are activation checkpointing and DDP vs FSDP.
UNHASHED_FIELDS: frozenset[str] = frozenset(
    {
        "checkpoint",
        "logging",
        "data.num_workers",
        "data.path",
        "stop_at_step",
        "device",
        "collapse",
        "compile",
        "optim.fused",
        "optim.finite_check",
        "model.grad_checkpointing",
        "distributed",
    }
)


class TrainConfig(_Section):
    """A complete, validated pretraining run."""

    method: Method = Field("selfpatch", description="'dino' or 'selfpatch' (DINO + SelfPatch patch loss).")
    seed: Integer = Field(
        0, ge=0, le=2**31 - 1, description="Seeds model init, sampling, augmentation and stochastic depth."
    )
    precision: Precision = Field(
        "auto", description="auto = fp16 with GradScaler on CUDA (official use_fp16), fp32 on CPU; bf16 anywhere."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    stop_at_step: Integer | None = Field(
        None, ge=1, le=10**12, description="Checkpoint and stop after this global step, as a preemption would."
    )
    compile: Literal["off", "blocks", "full"] = Field(
        "off",
        description="torch.compile (official: eager). 'blocks': each ViT block, the heads and the loss terms as "
        "regions compiled once for all blocks (recompiles bounded by crop sizes, not depth); 'full': the whole "
        "student, teacher and loss. Same mathematics, fp32 rounding apart.",
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
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

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


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as dotted keys (`optim.lr`), values as they are; lists and empty sections stay one value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
