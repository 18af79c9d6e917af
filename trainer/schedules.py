"""Per-iteration schedules, precomputed as arrays like DINO's `utils.cosine_scheduler`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config import TrainConfig


def cosine_schedule(
    base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base`, then a half cosine from `base` to `final`."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * iters_per_epoch
    return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray  # per iteration
    weight_decay: np.ndarray  # per iteration
    momentum: np.ndarray  # per iteration, teacher EMA
    teacher_temp: np.ndarray  # per epoch

    @classmethod
    def build(cls, cfg: TrainConfig, iters_per_epoch: int, world_size: int) -> Schedules:
        o, loss = cfg.optim, cfg.loss
        peak_lr = o.lr * o.batch_size_per_gpu * world_size / 256.0  # linear scaling rule
        return cls(
            lr=cosine_schedule(peak_lr, o.min_lr, o.epochs, iters_per_epoch, warmup_epochs=o.warmup_epochs),
            weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, iters_per_epoch),
            momentum=cosine_schedule(o.momentum_teacher, 1.0, o.epochs, iters_per_epoch),
            teacher_temp=teacher_temp_schedule(
                loss.warmup_teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs, o.epochs
            ),
        )
