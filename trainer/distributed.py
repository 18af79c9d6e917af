"""Process-group setup from torchrun or SLURM environment variables, in one place (as DINO does)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0].split("[")[0]


def read_env() -> DistInfo:
    """torchrun (RANK/WORLD_SIZE/LOCAL_RANK) first, then SLURM tasks (SLURM_PROCID/NTASKS/LOCALID)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world)
        return DistInfo(rank, world, int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group if the environment describes one (NCCL on CUDA, gloo on CPU)."""
    info = read_env()
    if not info.enabled or dist.is_initialized():
        return info
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo",
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
    )
    return info


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if any rank raised the flag (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor)
    return bool(tensor.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
