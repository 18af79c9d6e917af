"""Job side of an evaluation: check the checkpoint, run the benchmark, leave the result, log an MLflow child run.

Payload: run_id, benchmark, config (resolved), dataset, checkpoint (path), checkpoint_sha256,
checkpoint_step, cache_dir. The checkpoint must still be the file the evaluation was planned for
(sha256). Metrics go to MLflow as `eval/<benchmark>/<metric>` in a child run `eval/<benchmark>` of the
pretraining run, and, when the checkpoint is the one the run's final export was made from, as tags of that
export's model version (trainer.registry). SIGTERM (cancel, preemption) ends the attempt as interrupted, so it
is requeued.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from orchestrator.jobs.files import (
    EXIT_BAD_JOB,
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    JobFile,
    lacks_payload,
    write_result,
)
from orchestrator.jobs.reporter import Reporter

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("orchestrator.jobs")
PAYLOAD = ("run_id", "benchmark", "config", "dataset", "checkpoint", "checkpoint_sha256", "checkpoint_step")


class StopRequestedError(Exception):
    """SIGTERM arrived: stop now, the attempt is requeued."""


def log_child_run(job: JobFile, status: str, metrics: dict[str, float], extra_tags: dict[str, str]) -> str | None:
    """An MLflow child run of the pretraining run (mlflow.parentRunId), never fatal to the evaluation."""
    payload = job.payload
    if not job.mlflow_run_id or not job.mlflow_experiment_id:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracking_uri=job.mlflow_tracking_uri)
        tags = {
            "mlflow.parentRunId": job.mlflow_run_id,
            "orch.run_id": str(payload["run_id"]),
            "orch.evaluation_id": job.job_id,
            "orch.ckpt_sha256": str(payload["checkpoint_sha256"]),
            "benchmark": str(payload["benchmark"]),
            **extra_tags,
        }
        run = client.create_run(job.mlflow_experiment_id, run_name=f"eval/{payload['benchmark']}", tags=tags)
        now = int(time.time() * 1000)
        step = int(payload["checkpoint_step"])
        batch = [Metric(f"eval/{name}", float(value), now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), 500):
            client.log_batch(run.info.run_id, metrics=batch[start : start + 500])
        client.set_terminated(run.info.run_id, status)
    except Exception as exc:  # MLflow is the view; the result file and SQL are the record
        log.warning("MLflow child run not logged: %s", exc)
        return None
    if status == "FINISHED":
        tag_model_version(client, job.mlflow_run_id, str(payload["checkpoint_sha256"]), metrics)
    return str(run.info.run_id)


def tag_model_version(client: MlflowClient, mlflow_run_id: str, sha256: str, metrics: dict[str, float]) -> None:
    """The metrics as `eval/...` tags of the model version registered from this checkpoint, if it is the run's
    final export (after the child run is FINISHED, see trainer.registry); never fatal to the evaluation."""
    from trainer.registry import tag_evaluation

    try:
        for uri in tag_evaluation(client, mlflow_run_id, sha256, metrics):
            log.info("MLflow: evaluation metrics tagged on %s", uri)
    except Exception as exc:
        log.warning("MLflow model version not tagged: %s", exc)


def run(job: JobFile, folder: Path, attempt: int, heartbeat_s: float = 15.0) -> int:
    from evaluator.benchmarks import get_benchmark
    from trainer.checkpoint import CheckpointError
    from trainer.data.datasets import DatasetError
    from trainer.files import sha256_file
    from trainer.presets import ConfigError

    payload = job.payload
    if lacks_payload(job, folder, attempt, PAYLOAD):
        return EXIT_BAD_JOB

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise StopRequestedError("interrupted by SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    reporter = Reporter(job, attempt)
    reporter.start()
    stop = reporter.beat_every(heartbeat_s)
    try:
        checkpoint = Path(str(payload["checkpoint"]))
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} no longer exists")
        actual = sha256_file(checkpoint)
        if actual != payload["checkpoint_sha256"]:
            raise CheckpointError(
                f"checkpoint {checkpoint} changed since it was recorded (sha256 {actual[:12]} != "
                f"{str(payload['checkpoint_sha256'])[:12]})"
            )
        result = get_benchmark(str(payload["benchmark"])).run(
            checkpoint, str(payload["dataset"]), payload["config"], cache_dir=payload.get("cache_dir")
        )
    except StopRequestedError as exc:
        write_result(folder, attempt, "interrupted", reason=str(exc))
        reporter.send("end", status="interrupted", reason=str(exc))
        return reporter.finish(stop, EXIT_INTERRUPTED)
    except (CheckpointError, DatasetError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        mlflow_run = log_child_run(job, "FAILED", {}, {"error": error[:500]})
        reason = f"{type(exc).__name__}: {error}"
        write_result(folder, attempt, "failed", reason=reason, mlflow_run_id=mlflow_run)
        reporter.send("end", status="failed", reason=reason)
        return reporter.finish(stop, EXIT_FAILED)
    mlflow_run = log_child_run(job, "FINISHED", result.metrics, {"benchmark_version": result.version})
    details: dict[str, Any] = {"version": result.version, "config_hash": result.config_hash}
    write_result(
        folder,
        attempt,
        "completed",
        metrics=result.metrics,
        seconds=result.seconds,
        mlflow_run_id=mlflow_run,
        **details,
    )
    reporter.send("end", status="completed")
    return reporter.finish(stop, EXIT_COMPLETED)
