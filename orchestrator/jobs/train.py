"""Job side of a pretraining run: train one attempt with `trainer.train`, report, leave the result file.

Payload: {"config": <TrainConfig as JSON>}. The trainer resumes from the run's own `train/checkpoint.pth`,
so every attempt (requeue after preemption, SLURM restart) continues where the last one stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from orchestrator.jobs.files import (
    EXIT_BAD_JOB,
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    JobFile,
    stop_request,
    write_result,
)
from orchestrator.jobs.reporter import Reporter, scheduler_job_id
from trainer.callbacks import CheckpointInfo, TrainCallback, TrainResult

TRAIN_DIR = "train"


def train_dir(folder: Path) -> Path:
    return Path(folder) / TRAIN_DIR


class ReportingCallback(TrainCallback):
    """Forwards the trainer's events (rank 0) to the service."""

    def __init__(self, reporter: Reporter, folder: Path) -> None:
        self.reporter, self.folder = reporter, folder

    def on_start(self, info: dict[str, Any]) -> None:
        self.reporter.start(**info)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.reporter.heartbeat(iteration=step, metrics=metrics)

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self.reporter.send(
            "checkpoint",
            path=str(checkpoint.path),
            epoch=checkpoint.epoch,
            iteration=checkpoint.iteration,
            sha256=checkpoint.sha256,
            checkpoint_kind=checkpoint.kind,
        )

    def on_end(self, result: TrainResult) -> None:
        stopped = stop_request(self.folder) if result.status == "interrupted" else None
        status, reason = ("stopped", stopped) if stopped is not None else (result.status, result.reason)
        status = "failed" if status == "collapsed" else status
        self.reporter.send("end", status=status, iteration=result.iteration, reason=reason)


def job_config(job: JobFile, folder: Path, attempt: int) -> dict[str, Any]:
    """The run's config with what only this attempt knows: where to write, which MLflow run to continue."""
    config = dict(job.payload["config"])
    config["checkpoint"] = {**config.get("checkpoint", {}), "output_dir": str(train_dir(folder)), "resume": True}
    tags = {**config.get("logging", {}).get("tags", {}), "orch.run_id": job.job_id, "orch.attempt": str(attempt)}
    if scheduler_job_id():
        tags[f"orch.{job.backend}_job_id"] = str(scheduler_job_id())
    config["logging"] = {
        **config.get("logging", {}),
        "tracking_uri": job.mlflow_tracking_uri,
        "run_id": job.mlflow_run_id,
        "tags": tags,
        "progress": "off",
    }
    return config


def failed(folder: Path, attempt: int, reporter: Reporter, reason: str) -> None:
    """Leave the failure's reason in the result file and report it; a full disk may refuse the file, and the
    service then diagnoses the folder itself."""
    reporter.send("end", status="failed", reason=reason)
    try:
        write_result(folder, attempt, "failed", reason=reason)
    except OSError as exc:
        print(f"orchestrator: result file not written ({exc}); the failure was: {reason}", file=sys.stderr)


def run(job: JobFile, folder: Path, attempt: int) -> int:
    from trainer.checkpoint import CheckpointError
    from trainer.data.datasets import DatasetError
    from trainer.distributed import read_env
    from trainer.engine import NonFiniteLossError
    from trainer.presets import ConfigError, validate_config
    from trainer.train import train

    try:
        cfg = validate_config(job_config(job, folder, attempt))
    except (KeyError, TypeError, ConfigError) as exc:
        write_result(folder, attempt, "failed", reason=f"bad job file: {exc}")
        return EXIT_BAD_JOB
    is_main = read_env().is_main
    reporter = Reporter(job, attempt) if is_main else None
    try:
        result = train(cfg, callbacks=[ReportingCallback(reporter, folder)] if reporter else [])
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as exc:
        if reporter:
            failed(folder, attempt, reporter, f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except Exception as exc:
        if reporter:
            failed(folder, attempt, reporter, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if reporter:
            reporter.close()
    if is_main and result.status == "collapsed":  # collapse.stop: a failure with the diagnostics' reason
        write_result(folder, attempt, "failed", iteration=result.iteration, epoch=result.epoch, reason=result.reason)
        return EXIT_FAILED
    stopped = stop_request(folder) if result.status == "interrupted" else None
    if is_main and stopped is not None:  # asked to end early (a search's early stopping): final, not resumed
        write_result(folder, attempt, "stopped", iteration=result.iteration, epoch=result.epoch, reason=stopped)
        return EXIT_COMPLETED
    if is_main:
        write_result(
            folder,
            attempt,
            result.status,
            iteration=result.iteration,
            epoch=result.epoch,
            reason=result.reason,
            checkpoint=str(result.checkpoint) if result.checkpoint else None,
            manifest=str(result.manifest) if result.manifest else None,
        )
    return EXIT_INTERRUPTED if result.status == "interrupted" else EXIT_COMPLETED
