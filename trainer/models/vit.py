"""timm Vision Transformers in the two layouts the methods need.

DINO variant: the standard timm ViT ([CLS] token, final LayerNorm); its features are the normed [CLS].
SelfPatch variant: no [CLS] and no final norm; its features are the raw last-block patch tokens.
Both keep timm's parameter names, so an exported state dict loads strictly into `timm.create_model`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.weight_init import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from trainer.config import Method, ModelConfig


def interpolate_pos_embed_dino(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's resize of a square (1, n*n, C) positional grid to `grid`: bicubic, scale factor with +0.1 offset.

    The offset (dino#8) keeps floor(n * scale) from rounding one cell short; passing a scale factor rather
    than a size also fixes the sampling positions, so this differs slightly from a size-based resize.
    """
    n = int(math.sqrt(patch_pos.shape[1]))
    height, width = grid
    if n * n != patch_pos.shape[1]:
        raise ValueError(f"positional embedding of {patch_pos.shape[1]} tokens is not a square grid")
    if (height, width) == (n, n):
        return patch_pos
    dim = patch_pos.shape[-1]
    resized = F.interpolate(
        patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2),
        scale_factor=((height + 0.1) / n, (width + 0.1) / n),
        mode="bicubic",
    )
    if resized.shape[-2:] != (height, width):
        raise RuntimeError(f"positional embedding resized to {tuple(resized.shape[-2:])}, expected {grid}")
    return resized.permute(0, 2, 3, 1).reshape(1, height * width, dim)


class MultiCropViT(VisionTransformer):
    """A timm ViT that takes any crop size whose side is a multiple of the patch size."""

    def __init__(self, *, pos_embed_interp: str = "dino", **kwargs: Any) -> None:
        super().__init__(dynamic_img_size=True, **kwargs)
        self.pos_embed_interp = pos_embed_interp
        if self.cls_token is not None:  # DINO initialises [CLS] like pos_embed (timm uses std 1e-6)
            trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_interp != "dino":
            return super()._pos_embed(x)
        batch, height, width, dim = x.shape
        assert self.pos_embed is not None
        prefix = self.num_prefix_tokens
        patch_pos = interpolate_pos_embed_dino(self.pos_embed[:, prefix:], (height, width))
        tokens = x.reshape(batch, height * width, dim)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
            patch_pos = torch.cat([self.pos_embed[:, :prefix], patch_pos], dim=1)
        out: torch.Tensor = self.pos_drop(tokens + patch_pos)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """DINO variant: normed [CLS] (B, C). SelfPatch variant: raw patch tokens (B, N, C)."""
        tokens = self.forward_features(x)
        return tokens[:, 0] if self.cls_token is not None else tokens


def timm_kwargs(cfg: ModelConfig, method: Method, img_size: int) -> dict[str, Any]:
    """Keyword arguments that rebuild the backbone with `timm.create_model(ARCHS[arch].timm_name, **kwargs)`."""
    width, depth, heads = cfg.dims
    kwargs: dict[str, Any] = {
        "num_classes": 0,
        "img_size": img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
    }
    if method == "selfpatch":
        kwargs.update(class_token=False, global_pool="avg", fc_norm=False, final_norm=False)
    return kwargs


def build_backbone(cfg: ModelConfig, method: Method, img_size: int, *, drop_path_rate: float) -> MultiCropViT:
    """Student (drop_path_rate = cfg.drop_path_rate) or teacher (0) backbone."""
    kwargs = timm_kwargs(cfg, method, img_size)
    return MultiCropViT(
        pos_embed_interp=cfg.pos_embed_interp,
        drop_path_rate=drop_path_rate,
        mlp_ratio=4.0,
        qkv_bias=True,
        **kwargs,
    )
