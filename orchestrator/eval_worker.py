"""The job side of an evaluation: `python -m orchestrator.eval_worker EVAL_DIR --attempt N`.

It checks that the checkpoint is still the one the evaluation was planned for (sha256), runs the
benchmark, writes `result-<attempt>.json` (metrics, or the one-line reason it failed) and logs an MLflow
child run `eval/<benchmark>` of the pretraining run, with metrics named `eval/<benchmark>/<metric>`.
Exit codes: 0 succeeded, 1 failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.evaluations import EvalJob
from orchestrator.worker import result_path
from trainer.files import atomic_write

log = logging.getLogger("orchestrator.eval_worker")


def write_result(folder: Path, attempt: int, status: str, **data: Any) -> None:
    record = {"attempt": attempt, "status": status, "at": time.time(), "host": socket.gethostname(), **data}
    atomic_write(result_path(folder, attempt), lambda tmp: tmp.write_text(json.dumps(record, default=str)))


def log_child_run(job: EvalJob, status: str, metrics: dict[str, float], extra_tags: dict[str, str]) -> str | None:
    """An MLflow child run of the pretraining run (mlflow.parentRunId), never fatal to the evaluation."""
    if not job.mlflow_parent_run_id or not job.mlflow_experiment_id:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracking_uri=job.mlflow_tracking_uri)
        tags = {
            "mlflow.parentRunId": job.mlflow_parent_run_id,
            "orch.run_id": job.run_id,
            "orch.evaluation_id": job.evaluation_id,
            "orch.ckpt_sha256": job.checkpoint_sha256,
            "benchmark": job.benchmark,
            **extra_tags,
        }
        run = client.create_run(job.mlflow_experiment_id, run_name=f"eval/{job.benchmark}", tags=tags)
        now = int(time.time() * 1000)
        batch = [Metric(f"eval/{name}", float(value), now, job.checkpoint_step) for name, value in metrics.items()]
        for start in range(0, len(batch), 500):
            client.log_batch(run.info.run_id, metrics=batch[start : start + 500])
        client.set_terminated(run.info.run_id, status)
        return str(run.info.run_id)
    except Exception as exc:  # MLflow is the view; the result file and SQL are the record
        log.warning("MLflow child run not logged: %s", exc)
        return None


def run(folder: Path, attempt: int) -> int:
    from evaluator.benchmarks import get_benchmark
    from trainer.checkpoint import CheckpointError
    from trainer.data.datasets import DatasetError
    from trainer.files import sha256_file
    from trainer.presets import ConfigError

    folder = Path(folder).resolve()
    try:
        job = EvalJob.read(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        write_result(folder, attempt, "failed", error=f"bad evaluation file: {exc}")
        return 1
    try:
        checkpoint = Path(job.checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} no longer exists")
        actual = sha256_file(checkpoint)
        if actual != job.checkpoint_sha256:
            raise CheckpointError(
                f"checkpoint {checkpoint} changed since it was recorded (sha256 {actual[:12]} != "
                f"{job.checkpoint_sha256[:12]})"
            )
        benchmark = get_benchmark(job.benchmark)
        result = benchmark.run(checkpoint, job.dataset, job.config, cache_dir=job.cache_dir)
    except (CheckpointError, DatasetError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        mlflow_run = log_child_run(job, "FAILED", {}, {"error": error[:500]})
        write_result(folder, attempt, "failed", error=f"{type(exc).__name__}: {error}", mlflow_run_id=mlflow_run)
        return 1
    mlflow_run = log_child_run(job, "FINISHED", result.metrics, {"benchmark_version": result.version})
    write_result(
        folder,
        attempt,
        "completed",
        metrics=result.metrics,
        version=result.version,
        config_hash=result.config_hash,
        seconds=result.seconds,
        mlflow_run_id=mlflow_run,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.eval_worker", description=__doc__)
    parser.add_argument("folder", type=Path, help="the evaluation folder holding eval.json")
    parser.add_argument("--attempt", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.folder, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
