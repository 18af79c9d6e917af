"""Helpers for the launcher tests: a micro run folder the real worker trains in, and a sink for its reports."""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from orchestrator.jobs.files import JobFile, read_result
from orchestrator.jobs.train import train_dir
from orchestrator.launchers.base import JobSpec, JobStatus, Launcher, Resources
from tests.support import micro_overrides
from trainer.presets import load_config

SMALL = Resources(cpus_per_task=1, mem_gb=0.5, time_min=10)
__all__ = ["read_result"]  # re-exported for the launcher tests

ITERS_PER_EPOCH = 8  # micro_overrides: 64 images, batch 8


class ReportSink:
    """Stands in for the service's report endpoint, so the worker's reporter never waits on retries."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with suppress(ValueError):
                    sink.reports.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def kinds(self) -> list[str]:
        return [str(r.get("kind")) for r in self.reports]


@contextmanager
def report_sink() -> Iterator[ReportSink]:
    sink = ReportSink()
    sink.thread.start()
    try:
        yield sink
    finally:
        sink.server.shutdown()
        sink.server.server_close()


def make_run_dir(run_dir: Path, api_url: str, backend: str, epochs: int = 2, *extra: str) -> Path:
    """A run folder as the service lays it out: job.json holding the validated micro config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny_cpu", micro_overrides(train_dir(run_dir), "selfpatch", f"optim.epochs={epochs}", *extra))
    JobFile(
        kind="train",
        job_id=run_dir.name,
        payload={"config": cfg.model_dump(mode="json")},
        api_url=api_url,
        report_path=f"/api/v1/runs/{run_dir.name}/reports",
        token="test-token",
        backend=backend,
        mlflow_tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}",
    ).write(run_dir)
    return run_dir


def job_spec(tmp_path: Path, argv: list[str], resources: Resources = SMALL, attempt: int = 1) -> JobSpec:
    """A job spec in a fresh work folder under tmp_path."""
    run_id = uuid.uuid4().hex[:12]
    workdir = tmp_path / run_id
    workdir.mkdir(parents=True)
    return JobSpec(job_id=run_id, attempt=attempt, name="test", argv=argv, workdir=workdir, resources=resources)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def ended(launcher: Launcher, job_id: str) -> JobStatus | None:
    status = launcher.poll(job_id)
    return status if status.state.ended else None


def trained_steps(run_dir: Path) -> int:
    """The last step the trainer logged (log.jsonl), 0 before the first."""
    try:
        lines = (train_dir(run_dir) / "log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "step":
            steps.append(int(record["iteration"]))
    return max(steps)
