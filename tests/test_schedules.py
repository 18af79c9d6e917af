"""Schedules at chosen iterations equal their closed forms."""

from __future__ import annotations

import math

import pytest

from trainer.presets import load_config
from trainer.schedules import Schedules, cosine_schedule, teacher_temp_schedule


def test_lr_schedule_warmup_then_cosine_closed_form() -> None:
    epochs, per_epoch, warmup = 10, 7, 2
    peak, final = 2e-3, 1e-6
    s = cosine_schedule(peak, final, epochs, per_epoch, warmup_epochs=warmup)
    w = warmup * per_epoch
    assert len(s) == epochs * per_epoch
    assert s[0] == 0.0
    assert s[w - 1] == pytest.approx(peak)
    for i in (3, 9):
        assert s[i] == pytest.approx(peak * i / (w - 1))
    n = epochs * per_epoch - w
    for j in (0, 1, 17, n - 1):
        assert s[w + j] == pytest.approx(final + 0.5 * (peak - final) * (1 + math.cos(math.pi * j / n)))


def test_weight_decay_and_momentum_schedules_from_a_config() -> None:
    cfg = load_config(None, ["optim.epochs=4", "optim.warmup_epochs=1", "optim.batch_size_per_gpu=32"])
    sched = Schedules.build(cfg, iters_per_epoch=5, world_size=4)
    total = 20
    assert sched.lr[4] == pytest.approx(5e-4 * 32 * 4 / 256)  # linear scaling rule, end of warm-up
    for i in (0, 7, 19):
        assert sched.weight_decay[i] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / total)))
        assert sched.momentum[i] == pytest.approx(1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * i / total)))


def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    t = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(t) == 100
    assert t[0] == pytest.approx(0.04)
    assert t[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert t[29] == pytest.approx(0.07) and t[99] == pytest.approx(0.07)
