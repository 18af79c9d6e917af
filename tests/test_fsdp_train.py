"""FSDP2 through `train()` on a 2-process gloo group: checkpoints in the plain layout, and an exact resume.

A run stopped mid-epoch and resumed must end with the weights of the uninterrupted run, which only holds
if the gathered student, teacher and optimizer state go back into the shards unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support import micro_overrides, run_ranks
from trainer.checkpoint import load_checkpoint
from trainer.distributed import DistInfo
from trainer.engine import Engine
from trainer.presets import load_config
from trainer.train import train


def _worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    train(load_config("tiny_cpu", overrides))  # joins and leaves the process group itself


def _run_two_processes(output_dir: Path, *extra: str) -> None:
    overrides = micro_overrides(output_dir, "selfpatch", "distributed.strategy=fsdp", "optim.batch_size_per_gpu=4")
    assert run_ranks(_worker, lambda rank, port: (rank, 2, port, [*overrides, *extra])) == [0, 0], extra


@pytest.mark.slow  # two processes train together, three times
def test_fsdp_run_checkpoints_in_the_plain_layout_and_resumes_exactly(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run_two_processes(straight)
    _run_two_processes(resumed, "stop_at_step=5")  # mid-epoch: 64 images / (2 x 4) = 8 steps per epoch
    mid = load_checkpoint(resumed / "checkpoint.pth")
    assert mid["iteration"] == 5 and mid["world_size"] == 2

    # the sharded run's checkpoint loads strictly into a plain one-process student, teacher and optimizer
    cfg = load_config("tiny_cpu", micro_overrides(tmp_path / "plain", "selfpatch"))
    plain = Engine.build(cfg, torch.device("cpu"), None, DistInfo())
    for part, model in (("student", plain.student), ("teacher", plain.teacher)):
        assert list(mid[part]) == list(model.state_dict())  # same keys in the same order
        assert all(type(value) is torch.Tensor for value in mid[part].values())  # no DTensor shards
        model.load_state_dict(mid[part], strict=True)
    optimizer = plain.optimizer.state_dict()
    assert [g["params"] for g in mid["optimizer"]["param_groups"]] == [g["params"] for g in optimizer["param_groups"]]
    assert sorted(mid["optimizer"]["state"]) == list(range(sum(len(g["params"]) for g in optimizer["param_groups"])))
    plain.optimizer.load_state_dict(mid["optimizer"])  # the ddp / plain layout: integer ids, whole tensors
    for pid, param in enumerate(p for g in plain.optimizer.param_groups for p in g["params"]):
        assert mid["optimizer"]["state"][pid]["exp_avg"].shape == param.shape

    _run_two_processes(resumed)
    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(resumed / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == 16
    assert any(not torch.equal(value, mid["teacher"][key]) for key, value in a["teacher"].items())  # it trained on
    for part in ("student", "teacher", "dino_loss"):
        assert list(a[part]) == list(b[part])
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), f"{part}.{key} differs after resume"
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"]), pid
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][pid]["exp_avg_sq"]), pid
