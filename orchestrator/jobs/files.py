"""The files a job and the service exchange through the job's folder, and the job's exit codes.

The service writes `job.json` (what to do, where to report, with which token) before each attempt; the job
always leaves `result-<attempt>.json` (completed, interrupted or failed, with its reason), so an attempt
can be settled even if every report was lost. Both are written atomically. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.files import atomic_write_text

JOB_FILE = "job.json"
#: Exit codes of every job runner. 75 (EX_TEMPFAIL) is the trainer's "checkpointed, resume me".
EXIT_COMPLETED, EXIT_FAILED, EXIT_BAD_JOB, EXIT_INTERRUPTED = 0, 1, 2, 75


@dataclass(frozen=True)
class JobFile:
    """What the service hands a job: its kind, the kind's payload, and how to report back."""

    kind: str  # a name from orchestrator.jobs.kinds.KINDS
    job_id: str
    payload: dict[str, Any]  # train: {"config"}; evaluate: benchmark, config, dataset, checkpoint, ...
    api_url: str
    report_path: str  # e.g. /api/v1/runs/<id>/reports
    token: str
    backend: str
    mlflow_tracking_uri: str
    mlflow_experiment_id: str | None = None
    mlflow_run_id: str | None = None  # train: the run's own; evaluate: the pretraining run (the parent)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> JobFile:
        data = json.loads((Path(folder) / JOB_FILE).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{JOB_FILE} does not hold an object")
        missing = [
            name for name in ("kind", "job_id", "payload", "api_url", "report_path", "token") if name not in data
        ]
        if missing:
            raise ValueError(f"{JOB_FILE} lacks {', '.join(missing)}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def write(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / JOB_FILE, json.dumps(asdict(self), indent=2), mode=0o600)  # holds a token

    @property
    def report_url(self) -> str:
        return f"{self.api_url.rstrip('/')}{self.report_path}"


def result_path(folder: Path, attempt: int) -> Path:
    return Path(folder) / f"result-{attempt}.json"


def read_result(folder: Path, attempt: int) -> dict[str, Any] | None:
    """An attempt's result file, or None if it left none (or none that parses as an object)."""
    try:
        data = json.loads(result_path(folder, attempt).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_result(folder: Path, attempt: int, status: str, **data: Any) -> None:
    record = {"attempt": attempt, "status": status, "at": time.time(), "host": socket.gethostname(), **data}
    atomic_write_text(result_path(folder, attempt), json.dumps(record, default=str))


def job_token(secret: bytes, job_id: uuid.UUID | str) -> str:
    """A job's report credential, derived from the server secret: nothing to store, nothing to leak in SQL."""
    digest = hmac.new(secret, f"job:{job_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def job_token_matches(secret: bytes, job_id: uuid.UUID | str, token: str) -> bool:
    return hmac.compare_digest(job_token(secret, job_id), token)
