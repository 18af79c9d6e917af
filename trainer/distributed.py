"""Process-group setup from torchrun or SLURM environment variables, in one place (as DINO does), and how
the student is spread over the processes (DDP, or FSDP2 for models that do not fit one GPU)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from trainer.config import TrainConfig


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


class StopVote:
    """Whether any rank asked to stop, agreed by every rank without stalling the device stream.

    Each step posts this rank's flags to an asynchronous all-reduce on a CPU (gloo) group and reads the
    vote it posted one step earlier: every rank acts on the same vote at the same step, one step after a
    flag was raised, and no step waits for the GPU to drain (reducing a CUDA tensor and reading it with
    `.item()` every step would). In one process the flags count at once.
    """

    def __init__(self, info: DistInfo) -> None:
        self.enabled = info.enabled
        self._group: Any = None
        if self.enabled and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # every rank creates it, in the same order
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, *flags: bool) -> tuple[bool, ...]:
        """Post this step's flags; return the vote of the step before (all False on the first step)."""
        if not self.enabled:
            return flags
        decided = self.settle()
        posted = torch.tensor([1.0 if flag else 0.0 for flag in flags])
        self._pending = (dist.all_reduce(posted, group=self._group, async_op=True), posted)
        return decided if decided is not None else tuple(False for _ in flags)

    def settle(self) -> tuple[bool, ...] | None:
        """Wait for the vote in flight, if any (before leaving the process group), and return it."""
        if self._pending is None:
            return None
        work, posted = self._pending
        self._pending = None
        work.wait()
        return tuple(bool(value > 0) for value in posted.tolist())


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_student(
    student: nn.Module, teacher: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device
) -> nn.Module:
    """The module the step runs the student's forward through: the student itself in one process, else
    DDP (cfg.distributed.strategy 'ddp') or the student sharded in place with FSDP2 ('fsdp').

    FSDP shards the teacher the same way, so the teacher EMA runs shard by shard on each rank with no
    communication. Parameter names do not change (FSDP2 wraps in place), but values become DTensor
    shards: a checkpoint needs `full_state_dict` on every rank.
    """
    if not info.enabled:
        return student
    if cfg.distributed.strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    reshard = cfg.distributed.reshard_after_forward
    shard_model(student, reshard_after_forward=reshard)
    shard_model(teacher, reshard_after_forward=True)  # forward only: nothing to keep for a backward
    return student


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True) -> None:
    """FSDP2 in place: each ViT block is one unit (its all-gather overlaps the previous block's compute),
    the rest (patch embedding, aggregation module, heads) the root unit."""
    from torch.distributed.fsdp import fully_shard

    backbone = model.get_submodule("backbone")
    for block in backbone.get_submodule("blocks").children():
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    model.register_state_dict_pre_hook(_refuse_sharded_state_dict)  # type: ignore[no-untyped-call]


_gathering = False  # inside `full_state_dict`: the sharded state dict is being gathered on every rank


def _refuse_sharded_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """A sharded module's plain state_dict() holds this rank's shards only: saving it would lose the rest."""
    if not _gathering and not prefix:
        raise RuntimeError(
            "an FSDP-sharded model's state_dict() holds only this rank's shards; "
            "call trainer.distributed.full_state_dict(model) on every rank instead"
        )


@contextmanager
def _allow_sharded_state_dict() -> Iterator[None]:
    global _gathering
    _gathering = True
    try:
        yield
    finally:
        _gathering = False


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole state dict on CPU, keys and shapes as an unsharded model's (the checkpoint layout).

    For an FSDP-sharded model this gathers every parameter, so every rank must call it; then only rank 0
    gets the tensors (the others an empty dict): rank 0 saves.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with _allow_sharded_state_dict():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(state)


def load_full_state_dict(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Load an unsharded state dict (a checkpoint's) into the model, sharded or not, strictly."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with _allow_sharded_state_dict():
        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order a plain `optimizer.state_dict()` numbers them."""
    name_of = {param: name for name, param in model.named_parameters()}
    return [name_of[param] for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state in the plain `optimizer.state_dict()` layout (integer ids in param_groups order,
    whole tensors on CPU), so ddp and fsdp checkpoints are interchangeable.

    For an FSDP-sharded model this gathers every state tensor, so every rank must call it; only rank 0
    gets the state (the others an empty dict).
    """
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with _allow_sharded_state_dict():
        named: dict[str, Any] = dict(get_optimizer_state_dict(model, optimizer, options=options))  # by name
    if not named.get("state") and not named.get("param_groups"):
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    state = {index[name]: named["state"][name] for name in sorted(named["state"], key=index.__getitem__)}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load a plain-layout optimizer state (a checkpoint's) into the optimizer of a sharded or plain model;
    under FSDP every rank must call it with the whole state."""
    if not is_sharded(model):
        optimizer.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    named: dict[str, Any] = {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
    with _allow_sharded_state_dict():
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
