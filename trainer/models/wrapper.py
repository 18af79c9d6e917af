"""Student/teacher networks: backbone + heads over a list of crops, one backbone pass per crop size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.models.heads import DINOHead
from trainer.models.selfpatch import AggregationHead
from trainer.models.vit import MultiCropViT, build_backbone


@dataclass
class MultiCropOutput:
    """Logits of one network over all crops it saw, crop-major like DINO (crop 0's batch first)."""

    cls_logits: torch.Tensor  # (n_crops * B, K)
    patch_logits: list[torch.Tensor]  # per crop-size group: (n_group_crops * B, N_group, K_patch); SelfPatch only
    group_crops: list[int]  # number of crops in each crop-size group
    features: torch.Tensor | None = None  # the image head's inputs, (n_crops * B, d): collapse diagnostics
    patch_features: list[torch.Tensor] | None = None  # the patch head's inputs, per group


def crop_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive crops with the same spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class DINOModel(nn.Module):
    """DINO: the normed [CLS] of each crop through one projection head."""

    def __init__(self, backbone: MultiCropViT, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], match: bool = False) -> MultiCropOutput:
        groups = crop_groups(crops)
        feats = torch.cat([self.backbone.features(torch.cat(crops[a:b])) for a, b in groups])
        return MultiCropOutput(self.head(feats), [], [b - a for a, b in groups], feats)


class SelfPatchModel(nn.Module):
    """DINO + SelfPatch: CLS-free backbone, aggregation module, image head and patch head."""

    def __init__(self, backbone: MultiCropViT, ca_head: AggregationHead, c_head: DINOHead, p_head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.ca_head = ca_head
        self.c_head = c_head
        self.p_head = p_head

    def forward(self, crops: list[torch.Tensor], match: bool = False) -> MultiCropOutput:
        patch = self.backbone.patch_embed.patch_size
        image_tokens, patch_logits, patch_features = [], [], []
        groups = crop_groups(crops)
        for a, b in groups:
            batch = torch.cat(crops[a:b])
            grid = (batch.shape[-2] // patch[0], batch.shape[-1] // patch[1])
            image, patches = self.ca_head(self.backbone.features(batch), grid, match=match)
            image_tokens.append(image)
            patch_features.append(patches)
            patch_logits.append(self.p_head(patches))
        images = torch.cat(image_tokens)
        counts = [b - a for a, b in groups]
        return MultiCropOutput(self.c_head(images), patch_logits, counts, images, patch_features)


def build_model(cfg: TrainConfig, *, student: bool) -> DINOModel | SelfPatchModel:
    """The student (with stochastic depth) or the teacher (without) for cfg.method."""
    backbone = build_backbone(
        cfg.model, cfg.method, cfg.img_size, drop_path_rate=cfg.model.drop_path_rate if student else 0.0
    )
    if student and cfg.model.grad_checkpointing:  # the teacher never runs a backward
        backbone.set_grad_checkpointing(True)
    width = cfg.model.dims[0]
    h = cfg.head

    def head(out_dim: int) -> DINOHead:
        return DINOHead(
            width,
            out_dim,
            hidden_dim=h.hidden_dim,
            bottleneck_dim=h.bottleneck_dim,
            nlayers=h.nlayers,
            norm_last_layer=h.norm_last_layer,
        )

    if cfg.method == "dino":
        return DINOModel(backbone, head(h.out_dim))
    return SelfPatchModel(backbone, AggregationHead.from_config(cfg), head(h.out_dim), head(cfg.selfpatch.out_dim))
