"""Optimiser construction and the per-step gradient surgery of DINO (spec 1.6)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.config import OptimConfig


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Group 0 is decayed (tensors with ndim > 1), group 1 is not (biases and 1-D norm parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups)  # lr and weight decay are set every step from the schedules
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


def set_schedule_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the first group is regularised
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients_per_tensor(params: Iterable[nn.Parameter], clip: float) -> torch.Tensor | None:
    """Rescale every gradient whose L2 norm exceeds `clip` to norm `clip` (DINO's per-tensor clip).

    Vectorised with foreach kernels: one norm launch and one multiply for all tensors, no host sync.
    Returns the pre-clip norms.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """During the first `freeze_epochs` epochs the heads' last layers get no update."""
    if epoch >= freeze_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, for all parameters at once."""
    teacher_params, student_params = list(teacher), [p.detach() for p in student]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
