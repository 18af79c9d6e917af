"""DINO's projection head: MLP, L2-normalised bottleneck, weight-normalised last layer (spec 1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.weight_init import trunc_normal_
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output unit.

    Same parameters and names (`weight_g`, `weight_v`) as `nn.utils.weight_norm` in DINO's checkpoints,
    without the deprecated hook machinery.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:  # g stays 1: the last layer is a cosine-similarity layer
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        out: torch.Tensor = self.last_layer(x)
        return out


def init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
