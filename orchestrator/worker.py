"""The job side of a run: what every launcher starts (`python -m orchestrator.worker RUN_DIR`).

It reads `RUN_DIR/job.json` (written by the service at submission), trains with `trainer.train`, reports
progress to the service over REST with the run's token, and always leaves `result-<attempt>.json`
behind, so the service can settle the attempt even if every report was lost.

Exit codes: 0 completed, 75 interrupted (preempted: resume from the checkpoint), 1 failed, 2 bad job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from trainer.callbacks import CheckpointInfo, TrainCallback, TrainResult
from trainer.files import atomic_write

log = logging.getLogger("orchestrator.worker")

EXIT_COMPLETED, EXIT_FAILED, EXIT_BAD_JOB, EXIT_INTERRUPTED = 0, 1, 2, 75
JOB_FILE = "job.json"


@dataclass(frozen=True)
class JobFile:
    """What the service hands a job: written once per run, read by every attempt."""

    run_id: str
    config: dict[str, Any]
    api_url: str
    token: str
    mlflow_tracking_uri: str
    mlflow_run_id: str | None
    backend: str

    @classmethod
    def read(cls, run_dir: Path) -> JobFile:
        data = json.loads((run_dir / JOB_FILE).read_text())
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    def write(self, run_dir: Path) -> None:
        path = run_dir / JOB_FILE
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=2)))
        path.chmod(0o600)  # holds the run's token


def result_path(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"result-{attempt}.json"


def read_result(folder: Path, attempt: int) -> dict[str, Any] | None:
    """An attempt's result file (training or evaluation job), or None if it left none."""
    try:
        data: dict[str, Any] = json.loads(result_path(folder, attempt).read_text())
        return data
    except (OSError, ValueError):
        return None


def train_dir(run_dir: Path) -> Path:
    return run_dir / "train"


def scheduler_job_id() -> str | None:
    env = os.environ  # Ray strips RAY_JOB_ID from jobs: its launcher passes the submission id as ORCH_JOB_ID
    return env.get("SLURM_JOB_ID") or env.get("ORCH_JOB_ID") or env.get("ORCH_LOCAL_JOB_ID")


class Reporter(TrainCallback):
    """Posts job events to the service from a background thread, so training never waits on the network.

    Reports are retried with backoff; whatever cannot be delivered is also in the trainer's log.jsonl and
    the result file, which the reconciler reads.
    """

    def __init__(self, job: JobFile, attempt: int, heartbeat_s: float = 15.0) -> None:
        self.url = f"{job.api_url.rstrip('/')}/api/v1/runs/{job.run_id}/reports"
        self.headers = {"Authorization": f"Bearer {job.token}"}
        self.attempt, self.heartbeat_s = attempt, heartbeat_s
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._last_beat = 0.0
        self._thread = threading.Thread(target=self._deliver, name="orch-reporter", daemon=True)
        self._thread.start()

    def send(self, kind: str, **data: Any) -> None:
        self._queue.put({"kind": kind, "attempt": self.attempt, "at": time.time(), **data})

    def _deliver(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while (report := self._queue.get()) is not None:
                delay = 0.5
                for _ in range(8):
                    try:
                        response = client.post(self.url, json=report, headers=self.headers)
                        if response.status_code < 500:
                            if response.status_code >= 400:
                                log.warning("report %s refused: %s", report["kind"], response.text[:200])
                            break
                    except httpx.HTTPError as exc:
                        log.debug("report %s failed: %s", report["kind"], exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- trainer callbacks (rank 0)
    def on_start(self, info: dict[str, Any]) -> None:
        self.send("start", host=socket.gethostname(), pid=os.getpid(), job_id=scheduler_job_id(), **info)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        if now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            self.send("heartbeat", iteration=step, metrics=metrics)

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self.send(
            "checkpoint",
            path=str(checkpoint.path),
            epoch=checkpoint.epoch,
            iteration=checkpoint.iteration,
            sha256=checkpoint.sha256,
            checkpoint_kind=checkpoint.kind,
        )

    def on_end(self, result: TrainResult) -> None:
        self.send("end", status=result.status, iteration=result.iteration, reason=result.reason)


def attempt_number(explicit: int | None) -> int:
    """The attempt given by the launcher, shifted by SLURM's own requeues of the same job."""
    base = explicit or 1
    return base + int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def write_result(run_dir: Path, attempt: int, status: str, **data: Any) -> None:
    record = {"attempt": attempt, "status": status, "at": time.time(), "host": socket.gethostname(), **data}
    atomic_write(result_path(run_dir, attempt), lambda tmp: tmp.write_text(json.dumps(record, default=str)))


def run(run_dir: Path, attempt: int | None = None) -> int:
    """Train one attempt of the run in `run_dir`; returns the process exit code."""
    from trainer.checkpoint import CheckpointError
    from trainer.data.datasets import DatasetError
    from trainer.distributed import read_env
    from trainer.engine import NonFiniteLossError
    from trainer.presets import ConfigError, validate_config
    from trainer.train import train

    run_dir = Path(run_dir).resolve()
    number = attempt_number(attempt)
    try:
        job = JobFile.read(run_dir)
        config = dict(job.config)
        config["checkpoint"] = {**config.get("checkpoint", {}), "output_dir": str(train_dir(run_dir)), "resume": True}
        tags = {**config.get("logging", {}).get("tags", {}), "orch.run_id": job.run_id, "orch.attempt": str(number)}
        if scheduler_job_id():
            tags[f"orch.{job.backend}_job_id"] = str(scheduler_job_id())
        config["logging"] = {
            **config.get("logging", {}),
            "tracking_uri": job.mlflow_tracking_uri,
            "run_id": job.mlflow_run_id,
            "tags": tags,
            "progress": "off",
        }
        cfg = validate_config(config)
    except (OSError, ValueError, TypeError, ConfigError) as exc:
        write_result(run_dir, number, "failed", reason=f"bad job file: {exc}")
        return EXIT_BAD_JOB

    is_main = read_env().is_main
    reporter = Reporter(job, number) if is_main else None
    try:
        result = train(cfg, callbacks=[reporter] if reporter else [])
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as exc:
        if is_main:
            write_result(run_dir, number, "failed", reason=f"{type(exc).__name__}: {exc}")
            if reporter:
                reporter.send("end", status="failed", reason=str(exc))
        return EXIT_FAILED
    except Exception as exc:
        if is_main:
            write_result(run_dir, number, "failed", reason=f"{type(exc).__name__}: {exc}")
            if reporter:
                reporter.send("end", status="failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if reporter:
            reporter.close()
    if is_main:
        write_result(
            run_dir,
            number,
            result.status,
            iteration=result.iteration,
            epoch=result.epoch,
            reason=result.reason,
            checkpoint=str(result.checkpoint) if result.checkpoint else None,
            manifest=str(result.manifest) if result.manifest else None,
        )
    return EXIT_INTERRUPTED if result.status == "interrupted" else EXIT_COMPLETED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.worker", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run folder holding job.json")
    parser.add_argument("--attempt", type=int, default=None, help="attempt number (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.run_dir, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
