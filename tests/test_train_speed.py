"""The fast optimisation step keeps DINO's numbers: fused/foreach AdamW, the deferred finite check, compile.

Speed itself is measured by benchmarks/train_step.py, never asserted here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import micro_overrides
from tests.support import run_ranks
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, StopVote
from trainer.engine import Engine, NonFiniteLossError, StepValues
from trainer.optim import build_optimizer, ema_update, masked_step, param_groups, set_schedule_values
from trainer.presets import load_config
from trainer.train import Meter, train


def _step(engine: Engine, crops: list[torch.Tensor], iteration: int = -1) -> StepValues:
    return engine.step(crops, epoch=1, lr=1e-3, weight_decay=0.04, momentum=0.99, temp=0.04, iteration=iteration)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _run_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, steps: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        set_schedule_values(optimizer, 1e-2 / (step + 1), 0.04 + 0.1 * step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("fused", ["auto", "fused", "foreach", "off"])
def test_every_optimizer_kernel_gives_the_reference_update(optimizer: str, fused: str) -> None:
    """The reference is what the trainer built before `optim.fused`: torch's default AdamW / SGD."""
    cfg = load_config("tiny_cpu", [f"optim.optimizer={optimizer}", f"optim.fused={fused}"]).optim
    reference_model, model = _model(), _model()
    groups = param_groups(reference_model)
    reference = torch.optim.AdamW(groups) if optimizer == "adamw" else torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    expected = _run_optimizer(reference, reference_model)
    built = build_optimizer(cfg, model, torch.device("cpu"))
    assert bool(built.defaults.get("fused")) == (fused in ("auto", "fused"))  # CPU has the fused kernels
    for got, want in zip(_run_optimizer(built, model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_masked_fused_step_changes_nothing_and_an_unmasked_one_is_a_plain_step() -> None:
    cfg = load_config("tiny_cpu", ["optim.fused=fused"]).optim
    model, twin = _model(), _model()
    opt, twin_opt = build_optimizer(cfg, model), build_optimizer(cfg, twin)
    _run_optimizer(opt, model, 2)
    _run_optimizer(twin_opt, twin, 2)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, math.nan)
    masked_step(opt, torch.ones((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(v, opt.state[next(model.parameters())][k]) for k, v in state.items())  # steps too

    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        a.grad = torch.full_like(a, 0.5)
        b.grad = torch.full_like(b, 0.5)
    masked_step(opt, torch.zeros((), dtype=torch.bool))
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    with pytest.raises(ValueError, match="fused"):
        masked_step(build_optimizer(load_config("tiny_cpu", ["optim.fused=foreach"]).optim, _model()), torch.ones(()))


def test_masked_teacher_ema_is_exact_either_way() -> None:
    teacher, student = _model(), _model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    plain = [p.detach().clone() for p in teacher.parameters()]
    ema_update(plain, student.parameters(), 0.99)
    kept = [p.detach().clone() for p in teacher.parameters()]
    ema_update(kept, student.parameters(), 0.99, keep=torch.ones((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(kept, plain, strict=True))
    skipped = [p.detach().clone() for p in teacher.parameters()]
    ema_update(skipped, student.parameters(), 0.99, keep=torch.zeros((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(skipped, teacher.parameters(), strict=True))


def _engine(tmp_path: Path, *extra: str, backend: str = "inductor") -> tuple[Engine, TrainConfig]:
    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", *extra))
    torch.manual_seed(0)
    return Engine.build(cfg, torch.device("cpu"), None, DistInfo(), compile_backend=backend), cfg


def _crops(cfg: TrainConfig, seed: int = 1) -> list[torch.Tensor]:
    gen, c, b = torch.Generator().manual_seed(seed), cfg.crops, cfg.optim.batch_size_per_gpu
    sizes = [c.global_size] * 2 + [c.local_size] * c.local_number
    return [torch.randn(b, 3, s, s, generator=gen) for s in sizes]


def _state(engine: Engine) -> dict[str, torch.Tensor]:
    out = {f"s.{k}": v.clone() for k, v in engine.student.state_dict().items()}
    out |= {f"t.{k}": v.clone() for k, v in engine.teacher.state_dict().items()}
    out |= {f"c.{k}": v.clone() for k, v in engine.loss_fn.state_dict().items()}
    for i, st in enumerate(engine.optimizer.state.values()):
        out |= {f"o{i}.{k}": v.clone() for k, v in st.items()}
    return out


def test_a_nonfinite_step_is_masked_on_the_device_then_stops_the_run(tmp_path: Path) -> None:
    engine, cfg = _engine(tmp_path)
    assert engine.guard is not None  # the default: deferred, fused AdamW on CPU
    values = _step(engine, _crops(cfg), 0)
    assert isinstance(values.loss, torch.Tensor) and values.loss.ndim == 0  # no float: nothing was synced
    before = _state(engine)
    bad = _crops(cfg, seed=2)
    bad[0][0, 0, 0, 0] = math.nan
    _step(engine, bad, 1)
    _step(engine, _crops(cfg, seed=3), 2)  # finite, but after a bad step: not applied either
    after = _state(engine)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"a masked step changed {changed[:5]}"
    with pytest.raises(NonFiniteLossError, match="iteration 1 in epoch 1"):
        engine.check_finite()


def test_the_per_step_check_raises_before_applying_the_step(tmp_path: Path) -> None:
    engine, cfg = _engine(tmp_path, "optim.finite_check=step")
    assert engine.guard is None
    _step(engine, _crops(cfg))
    before = _state(engine)
    bad = _crops(cfg, seed=2)
    bad[0][0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="not applied"):
        _step(engine, bad)
    after = _state(engine)
    # the loss already moved the centers before the check, as in DINO; nothing else moved
    assert [k for k in before if not torch.equal(before[k], after[k])] in ([], ["c.center", "c.patch_center"])


def test_deferred_and_per_step_checks_leave_the_same_last_checkpoint(tmp_path: Path, monkeypatch: Any) -> None:
    """A NaN at iteration 3: both modes stop with NonFiniteLossError and the newest checkpoint on disk is the
    state after iteration 2, bit for bit the same; the deferred one raised at the next save, not at once."""
    original = Engine.step

    def poisoned(self: Engine, crops: list[torch.Tensor], **kwargs: Any) -> Any:
        if kwargs["iteration"] == 3:
            crops = [c.clone() for c in crops]
            crops[0][0, 0, 0, 0] = math.nan
        return original(self, crops, **kwargs)

    monkeypatch.setattr(Engine, "step", poisoned)
    states = {}
    for mode in ("deferred", "step"):
        out = tmp_path / mode
        extra = [f"optim.finite_check={mode}", "checkpoint.every_n_steps=1", "logging.log_every=4"]
        with pytest.raises(NonFiniteLossError) as err:
            train(load_config("tiny_cpu", micro_overrides(out, "selfpatch", *extra)))
        if mode == "deferred":
            assert "iteration 3" in str(err.value)
        states[mode] = load_checkpoint(out / "checkpoint.pth")
    assert states["deferred"]["iteration"] == states["step"]["iteration"] == 3
    for part in ("student", "teacher", "dino_loss"):
        for key, tensor in states["step"][part].items():
            assert torch.equal(tensor, states["deferred"][part][key]), f"{part}.{key}"


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_a_compiled_step_gives_the_eager_losses(tmp_path: Path, mode: str) -> None:
    """Backend aot_eager: dynamo's graphs and AOT autograd, run by eager kernels (inductor's CPU code generation
    takes minutes on 2 cores; benchmarks/train_step.py measures it). Drop-path masks come from the same RNG."""
    eager, cfg = _engine(tmp_path)
    compiled, _ = _engine(tmp_path, f"compile={mode}", backend="aot_eager")
    for i in range(3):  # later steps also compare the optimizer, EMA and centers of both
        torch.manual_seed(i)
        want = _step(eager, _crops(cfg, seed=i), i)
        torch.manual_seed(i)
        got = _step(compiled, _crops(cfg, seed=i), i)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        assert got.patch_loss is not None and want.patch_loss is not None
        torch.testing.assert_close(got.patch_loss, want.patch_loss, rtol=1e-5, atol=1e-6)
    assert set(compiled.student.state_dict()) == set(eager.student.state_dict())  # checkpoints unchanged


def test_block_compilation_is_shared_by_all_blocks(tmp_path: Path) -> None:
    """One set of graphs (per crop size, grad mode, drop path or not) serves every block: deeper, no more."""
    from torch._dynamo.utils import counters

    graphs = []
    for depth in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        engine, cfg = _engine(tmp_path, "compile=blocks", f"model.depth={depth}", backend="aot_eager")
        for i in range(2):
            _step(engine, _crops(cfg, seed=i), i)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0


def test_meter_means_are_those_of_the_step_values() -> None:
    meter = Meter()
    values = [2.5, 3.25, float(np.float32(1.1))]
    for v in values:
        meter.add(8, loss=torch.tensor(v), cls_loss=torch.tensor(2 * v))
    window = meter.window_means()
    assert window["loss"] == pytest.approx(np.mean(values)) and window["cls_loss"] == pytest.approx(2 * np.mean(values))
    assert window["img_per_s"] > 0
    meter.add(8, loss=torch.tensor(10.0), cls_loss=torch.tensor(0.0))
    assert meter.window_means()["loss"] == 10.0  # a new window
    assert meter.epoch_means()["loss"] == pytest.approx(np.mean([*values, 10.0]))


def test_speed_options_default_to_eager_and_leave_the_config_hash_alone() -> None:
    base = load_config("tiny_cpu", [])
    assert (base.compile, base.optim.fused, base.optim.finite_check) == ("off", "auto", "deferred")
    fast = load_config("tiny_cpu", ["compile=blocks", "optim.fused=foreach", "optim.finite_check=step"])
    assert fast.config_hash() == base.config_hash()


def _voter(rank: int, port: int, raised_at: int, results: Any) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    vote = StopVote(DistInfo(rank, 2, rank))
    seen = [vote(rank == 1 and step >= raised_at, rank == 0 and step == 0) for step in range(6)]
    results[rank] = (seen, vote.settle())
    dist.barrier()  # leave together, as train() does
    dist.destroy_process_group()


def test_the_stop_vote_reaches_every_rank_at_the_same_step_one_step_later() -> None:
    """Rank 1 alone raises a flag at step 3: both ranks see it at step 4, none earlier; a flag raised once
    counts once; the vote still in flight is settled before leaving the group."""
    import multiprocessing

    manager = multiprocessing.get_context("spawn").Manager()
    results = manager.dict()
    assert run_ranks(_voter, lambda rank, port: (rank, port, 3, results)) == [0, 0]
    expected = [(False, False), (False, True), (False, False), (False, False), (True, False), (True, False)]
    assert results[0] == results[1] == (expected, (True, False))


def test_in_one_process_the_flags_count_at_once() -> None:
    vote = StopVote(DistInfo())
    assert vote(True, False) == (True, False) and vote.settle() is None
