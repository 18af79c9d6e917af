"""Training checkpoints in DINO's layout, written atomically and loaded with `weights_only=True`.

Layout: student, teacher (state dicts without a DDP prefix), optimizer, epoch (the epoch to run next, or
the one in progress for a mid-epoch save), iteration (global steps done), config (plain dict), args
(the equivalent DINO/SelfPatch command-line flags), dino_loss (both centers), fp16_scaler, rng, metrics.
Reading weights out of any checkpoint (ours or foreign) is `trainer.weights`' job; this module saves and
loads whole training states.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from trainer.files import atomic_write

FORMAT_VERSION = 1
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "iteration", "config")
#: Classes the official DINO / SelfPatch checkpoints pickle next to their tensors (`args`); timm allows it too.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically; a failed write (a full disk) leaves the previous file intact and says why."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:
        cause = root_os_error(exc)  # torch reports a full disk as "unexpected pos": the OSError is its context
        raise CheckpointError(f"could not write checkpoint {path.name}: {cause or exc}") from exc


def root_os_error(exc: BaseException) -> OSError | None:
    """The operating-system error behind an exception, if any (through __cause__ and __context__)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def link_latest(source: Path, latest: Path) -> None:
    """Make `latest` name the same file as `source` atomically (hard link, copy where links fail)."""
    tmp = latest.with_name(f".{latest.name}.{os.getpid()}.lnk")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, latest)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a trainer checkpoint safely (weights_only), with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "Weights only load failed" in first_line:
            first_line = "it holds pickled Python objects or is not a torch file at all"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights-only torch file: {first_line}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def require_training_checkpoint(state: dict[str, Any], path: Path) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this trainer: missing {', '.join(missing)} "
            f"(keys found: {', '.join(sorted(state)[:8])})"
        )


def strip_prefixes(
    state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
) -> dict[str, torch.Tensor]:
    """Drop DDP / torch.compile prefixes so any of our layouts loads into a bare module."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from, as weights_only-loadable values."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
