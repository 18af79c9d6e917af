"""Frozen feature extractors built from a training checkpoint or an export folder.

Both sources rebuild the trainer's own `MultiCropViT` (same positional-embedding resize as in training, any
input size that is a multiple of the patch size) and load its weights with a strict check: a missing,
unexpected or mis-shaped tensor is a `CheckpointError` naming it, never a silent partial load.

Image features (k-NN, linear probe), chosen by `FeatureSpec.pool`:
  * `cls`: the normed [CLS] token (DINO variant); with `n_last_blocks=4`, the normed [CLS] of the last 4
    blocks concatenated (DINO's ViT-S linear protocol).
  * `ca`: the SelfPatch aggregation module's image token (needs `ca_head` from a training checkpoint).
  * `avg`: average-pooled patch tokens (normed for DINO, raw for SelfPatch, as each backbone outputs them).
Dense tasks read block outputs as NCHW maps (`block_maps`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.checkpoint import CheckpointError, load_checkpoint, strip_prefixes
from trainer.config import TrainConfig
from trainer.files import sha256_file
from trainer.models.selfpatch import AggregationHead
from trainer.models.vit import MultiCropViT, build_backbone
from trainer.presets import ConfigError, validate_config

Pool = Literal["auto", "cls", "ca", "avg"]
MANIFEST = "manifest.json"
#: Export files in order of preference (safetensors cannot run code when loaded).
EXPORT_FILES = (("safetensors", "backbone.safetensors"), ("torch", "backbone.pth"))


class FeatureSpec(BaseModel):
    """Which image-level feature a probe reads from the backbone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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


class Backbone(nn.Module):
    """A ViT backbone (plus SelfPatch's aggregation module when available) with its identity."""

    def __init__(
        self, vit: MultiCropViT, cfg: TrainConfig, identity: str, source: str, ca_head: AggregationHead | None = None
    ) -> None:
        super().__init__()
        self.vit = vit
        self.ca_head = ca_head
        self.cfg = cfg
        self.identity = identity  # sha256 of the weights file, or a description of a baseline
        self.source = source

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def patch_size(self) -> int:
        return int(self.cfg.model.patch_size)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def has_cls(self) -> bool:
        return self.vit.cls_token is not None

    def freeze(self) -> Backbone:
        """No gradients and eval mode: the probes never change the backbone."""
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)
        return self

    def resolve(self, spec: FeatureSpec) -> FeatureSpec:
        """Replace pool='auto' by the concrete choice and check that the choice is possible."""
        pool, n = spec.pool, spec.n_last_blocks or 1
        if pool == "auto":
            pool = "cls" if self.has_cls else ("ca" if self.ca_head is not None else "avg")
        if pool == "cls" and not self.has_cls:
            raise CheckpointError(
                f"{self.source}: the SelfPatch backbone has no [CLS] token; use pool 'ca' (aggregation token) or 'avg'"
            )
        if pool == "ca":
            if self.ca_head is None:
                raise CheckpointError(
                    f"{self.source}: pool 'ca' needs the aggregation module (ca_head), which only a SelfPatch "
                    "training checkpoint holds; use pool 'avg' or pass the training checkpoint"
                )
            if n != 1:
                raise ValueError("pool 'ca' reads the last block only: n_last_blocks must be 1")
        if n > self.depth:
            raise ValueError(f"n_last_blocks ({n}) exceeds the backbone depth ({self.depth})")
        return FeatureSpec(pool=pool, n_last_blocks=n)

    def image_features(self, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
        """(B, D) features of normalised images (B, 3, H, W); D = embed_dim * n_last_blocks."""
        spec = self.resolve(spec)
        n = spec.n_last_blocks or 1
        outputs: list[Any] = self.vit.forward_intermediates(  # type: ignore[assignment]
            images, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=self.has_cls
        )
        if spec.pool == "cls":
            return torch.cat([prefix[:, 0] for _, prefix in outputs], dim=-1)
        tokens: list[torch.Tensor] = [out[0] if isinstance(out, tuple) else out for out in outputs]
        if spec.pool == "avg":
            return torch.cat([t.mean(dim=1) for t in tokens], dim=-1)
        assert self.ca_head is not None
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        image_token: torch.Tensor = self.ca_head(tokens[-1], grid, match=False)[0]
        return image_token

    def block_maps(self, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the given blocks (0-based, repeats allowed) as (B, C, H/p, W/p) maps, without final norm."""
        return vit_block_maps(self.vit, images, indices)


def vit_block_maps(vit: MultiCropViT, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """Block outputs of a ViT (0-based indices, repeats allowed) as NCHW maps at stride = patch size."""
    unique = sorted(set(indices))
    if not unique or unique[0] < 0 or unique[-1] >= len(vit.blocks):
        raise ValueError(f"block indices {list(indices)} outside 0..{len(vit.blocks) - 1}")
    maps: list[torch.Tensor] = vit.forward_intermediates(  # type: ignore[assignment]
        images, indices=unique, norm=False, output_fmt="NCHW", intermediates_only=True, stop_early=True
    )
    by_index = dict(zip(unique, maps, strict=True))
    return [by_index[i] for i in indices]


def spread_indices(depth: int, fractions: Sequence[float]) -> list[int]:
    """Block indices (0-based) at the given fractions of the depth: ceil(depth * f) - 1, at least 0."""
    return [max(0, math.ceil(depth * f - 1e-9) - 1) for f in fractions]


def default_out_indices(depth: int, paper_blocks: Sequence[int], paper_depth: int = 12) -> list[int]:
    """The paper's blocks (1-based, for a 12-block ViT) for depth 12; evenly spaced blocks otherwise."""
    if depth == paper_depth:
        return [b - 1 for b in paper_blocks]
    return spread_indices(depth, [(i + 1) / len(paper_blocks) for i in range(len(paper_blocks))])


# ----------------------------------------------------------------------------------------------- loading


def _strict_load(module: nn.Module, weights: dict[str, torch.Tensor], what: str, source: str) -> None:
    """load_state_dict(strict) with every problem named in one CheckpointError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {', '.join(missing[:5])}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        problems.append(f"unexpected {', '.join(unexpected[:5])}{more}")
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(
            f"{source}: {what} weights do not match the model its config describes: {'; '.join(problems)}"
        )
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: {what} weights contain NaN or inf ({', '.join(bad[:3])})")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)


def _config(data: Any, source: str) -> TrainConfig:
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: no training config stored with the weights")
    try:
        return validate_config(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: the stored config is not valid for this trainer: {exc}") from exc


def _vit(cfg: TrainConfig) -> MultiCropViT:
    return build_backbone(cfg.model, cfg.method, cfg.img_size, drop_path_rate=0.0)


def _ca_head(cfg: TrainConfig) -> AggregationHead:
    width, _, heads = cfg.model.dims
    sp = cfg.selfpatch
    return AggregationHead(width, heads, k=sp.k, window=sp.window, border=sp.border, num_blocks=sp.num_blocks)


def _from_training_checkpoint(path: Path, weights_key: str) -> Backbone:
    source = str(path)
    state = load_checkpoint(path)
    if weights_key not in state or "config" not in state:
        found = ", ".join(sorted(map(str, state))[:8]) or "nothing"
        raise CheckpointError(
            f"{source} is not a training checkpoint of this trainer: needs '{weights_key}' and 'config' "
            f"(found {found}); for an export pass its folder or manifest.json"
        )
    if not isinstance(state[weights_key], dict):
        raise CheckpointError(f"{source}: '{weights_key}' is not a state dict")
    cfg = _config(state["config"], source)
    weights = strip_prefixes(state[weights_key])
    vit = _vit(cfg)
    _strict_load(vit, _prefixed(weights, "backbone.", source), "backbone", source)
    ca_head = None
    if cfg.method == "selfpatch":
        ca_head = _ca_head(cfg)
        _strict_load(ca_head, _prefixed(weights, "ca_head.", source), "ca_head", source)
    identity = sha256_file(path) if weights_key == "teacher" else f"{sha256_file(path)}:{weights_key}"
    return Backbone(vit, cfg, identity, source, ca_head)


def _prefixed(weights: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    out = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"{source}: no '{prefix}*' weights in the checkpoint")
    return out


def _from_export(manifest_path: Path) -> Backbone:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not a readable export manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} is not an export manifest")
    cfg = _config(manifest.get("config"), str(manifest_path))
    files = manifest.get("files") or {}
    for fmt, default_name in EXPORT_FILES:
        entry = files.get(fmt)
        if not entry:
            continue
        path = manifest_path.parent / entry.get("path", default_name)
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {manifest_path} but missing")
        digest = sha256_file(path)
        if entry.get("sha256") and entry["sha256"] != digest:
            raise CheckpointError(f"{path} is corrupt: sha256 {digest[:16]} differs from the manifest's")
        weights = _read_export(path, fmt)
        vit = _vit(cfg)
        _strict_load(vit, strip_prefixes(weights), "backbone", str(path))
        return Backbone(vit, cfg, digest, str(path), _exported_ca_head(manifest_path, files.get("aggregation"), cfg))
    raise CheckpointError(f"{manifest_path} lists no backbone.safetensors or backbone.pth export")


def _exported_ca_head(manifest_path: Path, entry: dict[str, Any] | None, cfg: TrainConfig) -> AggregationHead | None:
    """SelfPatch exports carry the aggregation module, so its image token works from an export too."""
    if not entry or cfg.method != "selfpatch":
        return None
    path = manifest_path.parent / entry.get("path", "aggregation.safetensors")
    if not path.is_file() or (entry.get("sha256") and entry["sha256"] != sha256_file(path)):
        raise CheckpointError(f"{path} is missing or differs from the sha256 in {manifest_path}")
    head = _ca_head(cfg)
    _strict_load(head, _read_export(path, "safetensors"), "aggregation module", str(path))
    return head


def _read_export(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    state = load_checkpoint(path)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a plain state dict of tensors")
    return state


def load_backbone(path: Path | str, weights_key: str = "teacher", device: str | torch.device = "cpu") -> Backbone:
    """A frozen backbone from a training checkpoint (.pth), an export folder, or an export's manifest.json.

    A file that sits in an export folder (backbone.pth, teacher_backbone.pth, ...) is read through the
    folder's manifest, which holds the config needed to rebuild the model.
    """
    path = Path(path)
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(f"{path} is a folder without {MANIFEST}: not an export of this trainer")
        backbone = _from_export(manifest)
    elif path.name == MANIFEST:
        backbone = _from_export(path)
    elif not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    elif path.suffix == ".safetensors" or (
        (path.parent / MANIFEST).is_file() and path.name in {"backbone.pth", "teacher_backbone.pth", "backbone_mm.pth"}
    ):
        backbone = _from_export(path.parent / MANIFEST)
    else:
        backbone = _from_training_checkpoint(path, weights_key)
    return backbone.to(device).freeze()


def random_backbone(like: Path | str | TrainConfig, seed: int = 0, device: str | torch.device = "cpu") -> Backbone:
    """A randomly initialised backbone of the same shape: the floor a pretrained model must beat."""
    if isinstance(like, TrainConfig):
        cfg = like
    else:
        path = Path(like)
        if path.is_dir() or path.name == MANIFEST:
            manifest = path / MANIFEST if path.is_dir() else path
            cfg = _config(json.loads(manifest.read_text()).get("config"), str(manifest))
        else:
            cfg = _config(load_checkpoint(path).get("config"), str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = _vit(cfg)
        ca_head = _ca_head(cfg) if cfg.method == "selfpatch" else None
    identity = f"random-init:{cfg.config_hash()[:16]}:seed{seed}"
    return Backbone(vit, cfg, identity, f"random init ({cfg.method}, seed {seed})", ca_head).to(device).freeze()


class PixelFeatures(nn.Module):
    """Raw pixels as features (the other floor): the flattened, normalised input image."""

    identity = "raw-pixels:v1"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)
