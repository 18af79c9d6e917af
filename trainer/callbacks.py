"""Hooks through which a launcher follows a training run (checkpoints, progress) without touching the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    epoch: int  # epochs completed when saved
    iteration: int  # global steps completed when saved
    sha256: str
    kind: str  # "epoch", "periodic" (numbered copy), "step" or "interrupt"


@dataclass
class TrainResult:
    status: str  # "completed", "interrupted" (resume to continue) or "collapsed" (stopped: collapse.stop)
    epoch: int
    iteration: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    manifest: Path | None = None
    reason: str | None = None


class TrainCallback:
    """Override what you need; every hook runs on rank 0 only."""

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        pass

    def on_collapse(self, record: dict[str, Any]) -> None:
        """The run was found collapsed (`record` is its log.jsonl entry)."""

    def on_end(self, result: TrainResult) -> None:
        pass
