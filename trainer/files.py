"""Files every layer writes or names, without torch: atomic writes, sha256, checkpoint and export names.

The orchestrator, the launchers and the job runners use these too, so they live here, below the trainer's
torch code: importing this module never imports torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The latest training checkpoint of a run (rewritten at every save).
LATEST = "checkpoint.pth"
#: Numbered checkpoints, `checkpointNNNN.pth` (NNNN = 0-based epoch index, as DINO names them): stable files.
NUMBERED = re.compile(r"checkpoint(\d{4})\.pth$")
#: The manifest an export folder carries (files, sha256, config, how to load them).
MANIFEST = "manifest.json"
#: The files of an export folder by format, in the writer's order; readers prefer safetensors (no code runs).
EXPORT_FILES: dict[str, str] = {
    "torch": "backbone.pth",  # plain timm state dict
    "safetensors": "backbone.safetensors",  # the same, as safetensors
    "mm": "backbone_mm.pth",  # {'state_dict': {'backbone.*'}} for mmdet / mmseg
    "dino": "teacher_backbone.pth",  # {'teacher': {'backbone.*'}} for DINO's eval scripts
    "aggregation": "aggregation.safetensors",  # SelfPatch only: the teacher's aggregation module (image token)
}


def numbered_name(epoch: int) -> str:
    return f"checkpoint{epoch:04d}.pth"


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Atomically replace `path` with `text`; `mode` (e.g. 0o600) is set before the file becomes visible."""

    def write(tmp: Path) -> None:
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)

    atomic_write(path, write)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
