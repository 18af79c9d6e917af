"""Frozen feature extractors built from any weights file `trainer.weights` reads.

Every source (a training checkpoint, an export folder, official DINO / SelfPatch checkpoints, DINO-eval, timm
or mm state dicts) becomes the trainer's own `MultiCropViT` (same positional-embedding resize as in training,
any input size that is a multiple of the patch size) through the one reader, which checks every tensor: a
missing, unexpected or mis-shaped tensor is a `CheckpointError` naming it, never a silent partial load.

Image features (k-NN, linear probe), chosen by `FeatureSpec.pool`:
  * `cls`: the normed [CLS] token (DINO variant); with `n_last_blocks=4`, the normed [CLS] of the last 4
    blocks concatenated (DINO's ViT-S linear protocol).
  * `ca`: the SelfPatch aggregation module's image token (needs the `ca_head` weights: a SelfPatch training
    checkpoint, or an export with aggregation.safetensors).
  * `avg`: average-pooled patch tokens (normed for DINO, raw for SelfPatch, as each backbone outputs them).
Dense tasks read block outputs as NCHW maps (`block_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluator.config import FeatureSpec
from trainer.checkpoint import CheckpointError
from trainer.config import TrainConfig
from trainer.models.selfpatch import AggregationHead
from trainer.models.vit import MultiCropViT, build_backbone
from trainer.weights import read_weights

__all__ = [
    "Backbone",
    "FeatureSpec",
    "PixelFeatures",
    "default_out_indices",
    "load_backbone",
    "random_backbone",
    "spread_indices",
    "vit_block_maps",
]


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
                    f"{self.source}: pool 'ca' needs the aggregation module (ca_head), which SelfPatch training "
                    "checkpoints and their exports (aggregation.safetensors) hold; use pool 'avg' or pass one of those"
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


def load_backbone(
    path: Path | str, weights_key: str = "teacher", device: str | torch.device = "cpu", *, num_heads: int | None = None
) -> Backbone:
    """A frozen backbone from any file `trainer.weights.read_weights` reads (`trainer.weights.LAYOUTS`).

    A file that sits in an export folder (backbone.pth, teacher_backbone.pth, ...) is read through the
    folder's manifest, which holds the config needed to rebuild the model. `num_heads` is for foreign files
    whose width is none of the named ViTs.
    """
    record = read_weights(path, key=weights_key, num_heads=num_heads)
    return (
        Backbone(record.vit(), record.config, record.identity, record.source, record.aggregation_head())
        .to(device)
        .freeze()
    )


def random_backbone(
    like: Path | str | TrainConfig, seed: int = 0, device: str | torch.device = "cpu", *, num_heads: int | None = None
) -> Backbone:
    """A randomly initialised backbone of the same shape: the floor a pretrained model must beat."""
    cfg = like if isinstance(like, TrainConfig) else read_weights(like, num_heads=num_heads).config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = build_backbone(cfg.model, cfg.method, cfg.img_size, drop_path_rate=0.0)
        ca_head = AggregationHead.from_config(cfg) if cfg.method == "selfpatch" else None
    identity = f"random-init:{cfg.config_hash()[:16]}:seed{seed}"
    return Backbone(vit, cfg, identity, f"random init ({cfg.method}, seed {seed})", ca_head).to(device).freeze()


class PixelFeatures(nn.Module):
    """Raw pixels as features (the other floor): the flattened, normalised input image."""

    identity = "raw-pixels:v1"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)
