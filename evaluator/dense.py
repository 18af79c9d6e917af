"""Pieces shared by the dense benchmarks (detection, segmentation): a trainable copy of the backbone,
mmdet/mmseg-style parameter groups and learning-rate schedules, devices, and endless seeded data loading."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evaluator.backbones import Backbone
from evaluator.config import DenseBackboneConfig, Device, Precision
from trainer.models.vit import MultiCropViT, build_backbone

#: mmdet/mmseg `paramwise_cfg.custom_keys` of the paper configs: no weight decay on these.
NO_DECAY_KEYS = ("pos_embed", "cls_token", "norm")


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA under 'auto' (the papers trained in fp16), fp32 on the CPU."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside the block only: a benchmark is repeatable and leaves the caller's RNG alone."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def trainable_vit(backbone: Backbone, cfg: DenseBackboneConfig) -> MultiCropViT:
    """A fresh copy of the backbone's ViT with stochastic depth, loaded strictly from the frozen one."""
    model_cfg = backbone.cfg.model
    weights = {k: v.detach().clone() for k, v in backbone.vit.state_dict().items()}
    method = backbone.cfg.method
    if method == "dino" and cfg.dino_cls_token == "drop":
        method = "selfpatch"  # same ViT without [CLS] and final norm
        weights.pop("cls_token")
        weights = {k: v for k, v in weights.items() if not k.startswith("norm.")}
        weights["pos_embed"] = weights["pos_embed"][:, 1:]
    vit = build_backbone(model_cfg, method, backbone.cfg.img_size, drop_path_rate=cfg.drop_path_rate)
    vit.load_state_dict(weights, strict=True)
    if cfg.freeze:
        vit.eval()
        for param in vit.parameters():
            param.requires_grad_(False)
    return vit


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: no decay for names containing pos_embed / cls_token / norm (mmdet custom_keys)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(key in name for key in NO_DECAY_KEYS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv's linear warm-up: from warmup_ratio to 1 over warmup_iters."""
    if iteration >= warmup_iters or warmup_iters == 0:
        return 1.0
    return 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)


def step_schedule(steps: Sequence[int], gamma: float, warmup_iters: int, warmup_ratio: float) -> Callable[[int], float]:
    """lr factor at an iteration: linear warm-up, then x gamma at each step (mmdet 1x: epochs 8 and 11)."""

    def factor(iteration: int) -> float:
        decays = sum(iteration >= s for s in steps)
        return float(gamma**decays * warmup_factor(iteration, warmup_iters, warmup_ratio))

    return factor


def poly_schedule(
    max_iters: int, power: float, min_ratio: float, warmup_iters: int, warmup_ratio: float
) -> Callable[[int], float]:
    """mmseg's poly decay to min_ratio (power 1.0 = linear) after a linear warm-up."""

    def factor(iteration: int) -> float:
        progress = min(iteration, max_iters) / max(1, max_iters)
        poly = (1.0 - min_ratio) * (1.0 - progress) ** power + min_ratio
        return float(poly * warmup_factor(iteration, warmup_iters, warmup_ratio))

    return factor


def endless(
    dataset: Dataset[Any],
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    num_workers: int,
    seed: int,
    set_epoch: Callable[[int], None] | None = None,
) -> Iterator[Any]:
    """Shuffled batches forever; epoch e shuffles with seed + e, so runs repeat exactly."""
    epoch = 0
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        yield from DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) >= batch_size,  # type: ignore[arg-type]
            num_workers=num_workers,
            collate_fn=collate,
            generator=generator,
        )
        epoch += 1


def timing(train_seconds: float, eval_seconds: float, device: torch.device) -> dict[str, float]:
    """Wall times (and peak GPU memory) of a dense run, for cost accounting."""
    out = {"train_seconds": train_seconds, "eval_seconds": eval_seconds}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def iterations_for(epochs: float, n_images: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * max(1, n_images // batch_size)))
