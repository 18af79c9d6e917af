"""The faster SelfPatch parts against the formulas they replace: same losses and gradients in fp32.

Each reference below is the earlier implementation, written out literally, so the fused or chunked code
is checked against it on identical inputs (values to ~1e-6 relative, gradients too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ValidationError

from tests.support import micro_overrides, run_ranks
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, full_state_dict, is_sharded, load_full_state_dict
from trainer.engine import Engine
from trainer.losses import MultiCropLoss, patch_cross_entropy
from trainer.models.selfpatch import AggregationHead, neighbor_index, neighbour_similarity, select_positives
from trainer.models.wrapper import build_model
from trainer.presets import ConfigError, load_config

RTOL, ATOL = 1e-6, 1e-7


def _old_patch_loss(
    loss: MultiCropLoss, student: list[torch.Tensor], teacher: list[torch.Tensor], temp: float, batch: int
) -> torch.Tensor:
    """The unchunked patch loss: full-size targets and log-probabilities, autograd through both."""
    per_view = []
    for s_group, t_group in zip(student, teacher, strict=False):
        targets = F.softmax((t_group - loss.patch_center) / temp, dim=-1).detach()
        log_probs = F.log_softmax(s_group[: t_group.shape[0]] / loss.student_temp, dim=-1)
        ce = -(targets * log_probs).sum(dim=-1)
        per_view.append(ce.reshape(-1, batch * ce.shape[-1]).mean(dim=1))
    return torch.cat(per_view).mean()


def _old_similarity(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x_norm = F.normalize(x, dim=-1)
    return torch.einsum("bnmc,bnc->bnm", x_norm[:, index], x_norm)


def _old_aggregation(
    head: AggregationHead, x: torch.Tensor, grid: tuple[int, int], match: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The earlier forward: gathered neighbour features for the similarity, keys gathered then concatenated
    with the query's own key, and one LayerNorm over [image; patches] sliced apart."""
    batch, n_patches, dim = x.shape
    image = head.cls_token.expand(batch, -1, -1)
    if not match:
        for block in head.blocks:
            image = block(x, image)
        out = head.norm(torch.cat([image, x], dim=1))
        return out[:, 0], out[:, 1:]
    index, valid = head.neighbours(grid, x.device)
    similarity = _old_similarity(x, index)
    if valid is not None:
        similarity = similarity.masked_fill(~valid, float("-inf"))
    top = similarity.topk(head.k, dim=-1).indices
    chosen = index.expand(batch, -1, -1).gather(2, top)
    mask = None if valid is None else valid.expand(batch, -1, -1).gather(2, top)
    rows = (chosen + torch.arange(batch).view(-1, 1, 1) * n_patches).reshape(-1)
    key_mask = None if mask is None else mask.reshape(batch * n_patches, head.k)
    summary = head.cls_token.expand(batch * n_patches, -1, -1)
    for block in head.blocks:
        keys, values = block.key_values(x)
        image = block.attend(image, keys, values)
        pos_keys = keys.reshape(-1, dim)[rows].view(batch * n_patches, head.k, dim)
        pos_values = values.reshape(-1, dim)[rows].view(batch * n_patches, head.k, dim)
        summary = block.attend(summary, pos_keys, pos_values, key_mask)
    out = head.norm(torch.cat([image, summary.reshape(batch, n_patches, dim)], dim=1))
    return out[:, 0], out[:, 1:]


def _assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, name: str = "", floor: float = 1e-6) -> None:
    """Max error within 1e-6 of the tensor's largest entry: sums over a different split of the same rows
    (two LayerNorm calls instead of one) round differently in their last bits, entry by entry."""
    got, expected = got.detach(), expected.detach()
    error = float((got - expected).abs().max())
    assert error <= 1e-6 * float(expected.abs().max()) + floor, (name, error)


def _grads(
    tensors: list[torch.Tensor], inputs: list[torch.Tensor], weights: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Gradients of sum_i <tensors_i, weights_i> (a generic downstream use) with respect to `inputs`."""
    total = sum((t * w).sum() for t, w in zip(tensors, weights, strict=True))
    assert isinstance(total, torch.Tensor)
    return torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("chunk_elements", [None, 7 * 5, 1])
def test_chunked_patch_loss_equals_the_unchunked_formula(chunk_elements: int | None) -> None:
    torch.manual_seed(0)
    batch, classes, temp = 3, 37, 0.04
    groups = [(2, 9), (4, 4)]  # (crops, patches per crop)
    student = [torch.randn(v * batch, n, classes, requires_grad=True) for v, n in groups]
    teacher = [torch.randn(v * batch, n, classes) for v, n in groups]
    loss = MultiCropLoss(11, classes)
    loss.patch_center.normal_()
    expected = _old_patch_loss(loss, student, teacher, temp, batch)
    expected_grads = torch.autograd.grad(expected, student)

    per_view = []
    for s, t in zip(student, teacher, strict=True):
        ce = patch_cross_entropy(s, t, loss.patch_center, temp, loss.student_temp, chunk_elements)
        per_view.append(ce.reshape(-1, batch * ce.shape[-1]).mean(dim=1))
    got = torch.cat(per_view).mean()
    got_grads = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)


def test_patch_loss_of_the_module_equals_the_unchunked_formula_at_vit_s_width() -> None:
    """MultiCropLoss.patch_loss at the real patch-head width (4096), teacher covering a prefix of the views."""
    torch.manual_seed(1)
    batch, classes, temp = 2, 4096, 0.04
    student = [torch.randn(4 * batch, 16, classes, requires_grad=True), torch.randn(3 * batch, 4, classes)]
    student[1].requires_grad_(True)
    teacher = [torch.randn(2 * batch, 16, classes), torch.randn(3 * batch, 4, classes)]
    loss = MultiCropLoss(11, classes)
    loss.patch_center.normal_()
    expected = _old_patch_loss(loss, student, teacher, temp, batch)
    expected_grads = torch.autograd.grad(expected, student)
    got = loss.patch_loss(student, teacher, temp, batch)
    got_grads = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)
    assert bool((got_grads[0][2 * batch :] == 0).all())  # views the teacher did not see get no patch gradient


def test_patch_loss_in_bf16_matches_the_unchunked_formula() -> None:
    torch.manual_seed(2)
    s = torch.randn(6, 5, 64).bfloat16().requires_grad_(True)
    t = torch.randn(6, 5, 64).bfloat16()
    center = torch.randn(1, 64)
    expected = -(F.softmax((t.float() - center) / 0.04, -1) * F.log_softmax(s.float() / 0.1, -1)).sum(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), s)
    got = patch_cross_entropy(s, t, center, 0.04, 0.1, chunk_elements=64 * 4)
    (got_grad,) = torch.autograd.grad(got.sum(), s)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_grad, expected_grad)  # bf16: at most one rounding apart


def test_patch_loss_refuses_a_second_backward_and_keeps_no_buffer_without_grad() -> None:
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8)
    ce = patch_cross_entropy(s, t, torch.zeros(1, 8), 0.04, 0.1)
    torch.autograd.backward(ce.sum(), retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        torch.autograd.backward(ce.sum())
    with torch.no_grad():
        plain = patch_cross_entropy(s, t, torch.zeros(1, 8), 0.04, 0.1)
    torch.testing.assert_close(plain, ce.detach())


@pytest.mark.parametrize(("height", "width", "dim"), [(14, 14, 48), (6, 6, 384), (3, 3, 1)])
def test_neighbour_similarity_equals_the_gathered_einsum(height: int, width: int, dim: int) -> None:
    """(3, 3, 1): N=9 > 8 * C takes the gather path; the others take the Gram matrix."""
    torch.manual_seed(3)
    x = torch.randn(4, height * width, dim)
    index, _ = neighbor_index(height, width, 3, "wrap")
    expected = _old_similarity(x, index)
    torch.testing.assert_close(neighbour_similarity(x, index), expected, rtol=RTOL, atol=1e-6)
    chosen, _ = select_positives(x, index, None, 4)
    assert torch.equal(chosen, index.expand(4, -1, -1).gather(2, expected.topk(4, dim=-1).indices))


@pytest.mark.parametrize(("border", "match"), [("wrap", True), ("valid", True), ("wrap", False)])
def test_aggregation_head_equals_the_earlier_forward_with_gradients(border: str, match: bool) -> None:
    torch.manual_seed(4)
    dim, heads, batch, grid = 48, 3, 3, (5, 5)
    head = AggregationHead(dim, heads, k=4, window=3, border=border)
    for param in head.parameters():  # away from the zero-bias init, so every path carries signal
        param.data.add_(0.05 * torch.randn_like(param))
    x = torch.randn(batch, grid[0] * grid[1], dim, requires_grad=True)
    params = [x, *head.parameters()]
    expected = _old_aggregation(head, x, grid, match)
    weights = [torch.randn_like(t) for t in expected]
    expected_grads = _grads(list(expected), params, weights)
    got = head(x, grid, match=match)
    got_grads = _grads(list(got), params, weights)
    for g, e in zip(got, expected, strict=True):  # the positives' attention is written out: float rounding
        _assert_close_to_scale(g, e, "output", floor=1e-7)
    for name, g_grad, e_grad in zip(["x", *dict(head.named_parameters())], got_grads, expected_grads, strict=True):
        if name.endswith("attn.k.bias"):  # softmax ignores a shift shared by all keys: zero up to rounding
            assert float(g_grad.abs().max()) < 1e-5 and float(e_grad.abs().max()) < 1e-5
        else:
            _assert_close_to_scale(g_grad, e_grad, name)


def _crops(cfg: TrainConfig, seed: int) -> list[torch.Tensor]:
    gen, c, b = torch.Generator().manual_seed(seed), cfg.crops, cfg.optim.batch_size_per_gpu
    sizes = [c.global_size] * 2 + [c.local_size] * c.local_number
    return [torch.randn(b, 3, s, s, generator=gen) for s in sizes]


def _two_steps(cfg: TrainConfig, info: DistInfo, steps: int = 2) -> tuple[Engine, list[float]]:
    torch.manual_seed(0)
    engine = Engine.build(cfg, torch.device("cpu"), None, info)
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # the same stochastic depth in every run
        values = engine.step(
            _crops(cfg, seed=10 * info.rank + i), epoch=1, lr=1e-3, weight_decay=0.04, momentum=0.99, temp=0.04
        )
        losses.append(float(values.loss))
    return engine, losses


def test_grad_checkpointing_gives_the_same_step(tmp_path: Path) -> None:
    """Two optimisation steps with and without recomputed blocks: same losses, same weights after."""
    runs = {}
    for flag in (False, True):
        cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", f"model.grad_checkpointing={flag}"))
        engine, losses = _two_steps(cfg, DistInfo())
        assert engine.student.backbone.grad_checkpointing is flag
        assert engine.teacher.backbone.grad_checkpointing is False
        runs[flag] = (losses, engine.student.state_dict(), engine.teacher.state_dict())
    (plain_losses, plain_s, plain_t), (ckpt_losses, ckpt_s, ckpt_t) = runs[False], runs[True]
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-6)
    assert plain_losses[0] != plain_losses[1]  # the first step changed the weights the second one used
    for plain, ckpt in ((plain_s, ckpt_s), (plain_t, ckpt_t)):
        assert plain.keys() == ckpt.keys()
        for key, value in plain.items():
            _assert_close_to_scale(ckpt[key], value, key)


def _distributed_worker(rank: int, world: int, strategy: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = Path(out_dir)
        cfg = load_config("tiny_cpu", micro_overrides(out, "selfpatch", f"distributed.strategy={strategy}"))
        engine, losses = _two_steps(cfg, DistInfo(rank, world, 0))
        assert is_sharded(engine.student) is (strategy == "fsdp")
        student, teacher = full_state_dict(engine.student), full_state_dict(engine.teacher)
        if strategy == "fsdp":
            with pytest.raises(RuntimeError, match="only this rank's shards"):
                engine.student.state_dict()
            load_full_state_dict(engine.teacher, full_state_dict_of(cfg))  # every rank, whole tensors
        if rank == 0:
            result: dict[str, Any] = {"losses": losses, "student": student, "teacher": teacher}
            result["center"] = engine.loss_fn.patch_center.clone()
            if strategy == "fsdp":
                result["reloaded"] = full_state_dict(engine.teacher)
            torch.save(result, out / f"{strategy}.pt")
        elif strategy == "fsdp":
            full_state_dict(engine.teacher)  # the gather is collective
        dist.barrier()  # leave together: a rank that tears gloo down while its peer still talks to it aborts
    finally:
        dist.destroy_process_group()


def full_state_dict_of(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A fresh teacher's weights (seeded), to load into a sharded one."""
    torch.manual_seed(7)
    return build_model(cfg, student=False).state_dict()


@pytest.mark.slow
def test_fsdp_step_equals_the_ddp_step_on_two_cpu_processes(tmp_path: Path) -> None:
    """FSDP2 on a 2-process gloo group: the same losses, weights and centers as DDP after two steps, the
    unsharded checkpoint layout, and a sharded model that refuses a shards-only state_dict()."""
    results = {}
    for strategy in ("ddp", "fsdp"):
        codes = run_ranks(_distributed_worker, lambda rank, port, s=strategy: (rank, 2, s, port, str(tmp_path)))
        assert codes == [0, 0], strategy
        results[strategy] = torch.load(tmp_path / f"{strategy}.pt", weights_only=True)
    ddp, fsdp = results["ddp"], results["fsdp"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert ddp["losses"][0] != ddp["losses"][1]
    torch.testing.assert_close(fsdp["center"], ddp["center"], rtol=1e-6, atol=1e-7)
    for part in ("student", "teacher"):
        assert list(fsdp[part]) == list(ddp[part])  # same keys in the same order: the checkpoint layout
        for key, value in ddp[part].items():
            assert type(fsdp[part][key]) is torch.Tensor and fsdp[part][key].shape == value.shape  # no DTensor
            # floor: the attention key biases have a zero gradient in exact arithmetic, so AdamW (which
            # normalises a gradient's size away) moves them by rounding noise, differently in each run
            _assert_close_to_scale(fsdp[part][key], value, f"{part}.{key}", floor=1e-5)
    reloaded, fresh = fsdp["reloaded"], full_state_dict_of(load_config("tiny_cpu", micro_overrides(tmp_path)))
    assert all(torch.equal(reloaded[key], value) for key, value in fresh.items())


def test_distributed_strategy_is_validated_and_left_out_of_the_hash(tmp_path: Path) -> None:
    base = load_config("tiny_cpu", micro_overrides(tmp_path))
    assert base.distributed.strategy == "ddp" and base.model.grad_checkpointing is False  # faithful defaults
    fsdp = load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", "distributed.strategy=fsdp"))
    ckpt = load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", "model.grad_checkpointing=true"))
    assert base.config_hash() == fsdp.config_hash() == ckpt.config_hash()  # how, not what, is computed
    with pytest.raises(ConfigError, match=r"distributed\.strategy"):
        load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", "distributed.strategy=zero3"))
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"model": {"grad_checkpointing": 2}})


def test_one_process_runs_the_bare_student_whatever_the_strategy(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", micro_overrides(tmp_path, "selfpatch", "distributed.strategy=fsdp"))
    engine = Engine.build(cfg, torch.device("cpu"), None, DistInfo())
    assert engine.student_ddp is engine.student and not is_sharded(engine.student)
    assert full_state_dict(engine.student).keys() == engine.student.state_dict().keys()
