"""Optimiser construction and the per-step gradient surgery of DINO (spec 1.6)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

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


def kernel_options(fused: str, device: torch.device) -> tuple[bool | None, bool]:
    """torch.optim's (`fused`, `foreach`) for `optim.fused`; auto = fused where the device has the kernels."""
    if fused == "auto":
        fused = "fused" if device.type in _get_fused_kernels_supported_devices() else "foreach"
    return (True, False) if fused == "fused" else (None, fused == "foreach")


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if device is None:
        device = next(model.parameters()).device
    fused, foreach = kernel_options(cfg.fused, device)
    if cfg.optimizer == "adamw":  # lr and weight decay are set every step from the schedules
        return torch.optim.AdamW(groups, fused=fused, foreach=foreach)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, fused=fused, foreach=foreach)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step` honours a `found_inf` flag on the device (the fused kernels), as GradScaler uses it."""
    return bool(optimizer.defaults.get("fused"))


def masked_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """A fused optimizer step that leaves parameters, moments and step counts unchanged where `skip` is 1.

    The flag goes through the same `found_inf` attribute GradScaler sets for fused optimizers, so the
    decision stays on the device: no host sync.
    """
    if not skips_on_device(optimizer):
        raise ValueError("masked_step needs a fused optimizer")
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


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
def ema_update(
    teacher: Iterable[torch.Tensor],
    student: Iterable[torch.Tensor],
    momentum: float,
    keep: torch.Tensor | None = None,
) -> None:
    """teacher <- m * teacher + (1 - m) * student, for all parameters at once.

    With `keep` (a 0-d bool tensor), the update happens only where it is true, decided on the device: the
    momentum becomes 1 and the student is multiplied by 0, so a skipped step leaves the teacher bit for bit
    unchanged, and a kept one runs the same kernels with the same scalars as without `keep` (bit for bit too).
    """
    teacher_params, student_params = list(teacher), [p.detach() for p in student]
    if keep is None:
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
        return
    dtype = teacher_params[0].dtype
    m = torch.full((), momentum, dtype=dtype, device=keep.device)  # a fill, not a host-to-device copy
    torch._foreach_mul_(teacher_params, torch.where(keep, m, torch.ones_like(m)))
    torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, keep.to(dtype)), alpha=1.0 - momentum)
