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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.strict import Count, FilePath, FiniteFloat, MetricName, Reason, strict_keys
from trainer.files import atomic_write_text

JOB_FILE = "job.json"
#: A request to end the job early on purpose (a search's early stopping), with the reason, in the job's folder.
STOP_REQUEST = "stop-request.json"
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


class JobFileError(ValueError):
    """A file in a job's folder the service must not trust (malformed, or naming files outside the folder):
    the job fails with this one-line reason; no other job is affected."""


class JobResult(BaseModel):
    """What `result-<attempt>.json` may say; anything else in it is ignored, anything malformed refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    status: Literal["completed", "interrupted", "failed", "stopped"]
    reason: Reason | None = None
    iteration: Count | None = None
    epoch: Count | None = None
    checkpoint: FilePath | None = None
    manifest: FilePath | None = None
    metrics: dict[MetricName, FiniteFloat] = Field(
        default_factory=dict, max_length=10_000, json_schema_extra=strict_keys
    )
    seconds: FiniteFloat | None = None
    mlflow_run_id: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_\-]*$")
    version: str | None = Field(None, max_length=32)
    config_hash: str | None = Field(None, max_length=64)


def lacks_payload(job: JobFile, folder: Path, attempt: int, keys: tuple[str, ...]) -> bool:
    """True (and the attempt failed with the reason) when the job file's payload lacks any of `keys`."""
    missing = [key for key in keys if key not in job.payload]
    if missing:
        write_result(folder, attempt, "failed", reason=f"bad job file: payload lacks {', '.join(missing)}")
    return bool(missing)


def result_path(folder: Path, attempt: int) -> Path:
    return Path(folder) / f"result-{attempt}.json"


def read_result(folder: Path, attempt: int) -> JobResult | None:
    """An attempt's result file, or None if it left none; JobFileError if it left one that is not valid."""
    path = result_path(folder, attempt)
    try:
        if path.stat().st_size > 1 << 20:
            raise JobFileError(f"{path.name} is larger than 1 MiB")
        return JobResult.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        first = str(exc).splitlines()[:2]
        raise JobFileError(f"{path.name} is not a valid result file: {' '.join(first)[:300]}") from exc


def confined(folder: Path, path: str | Path) -> Path:
    """`path` resolved (symlinks followed), refused unless it lies inside the job's own folder."""
    root = Path(folder).resolve()
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise JobFileError(f"path {str(path)[:200]!r} cannot be resolved: {exc}") from exc
    if not resolved.is_relative_to(root):
        raise JobFileError(f"path {str(path)[:200]!r} is outside the job's folder")
    return resolved


def write_result(folder: Path, attempt: int, status: str, **data: Any) -> None:
    record = {"attempt": attempt, "status": status, "at": time.time(), "host": socket.gethostname(), **data}
    atomic_write_text(result_path(folder, attempt), json.dumps(record, default=str))


def request_stop(folder: Path, reason: str) -> None:
    """Ask the job to end early on purpose: it checkpoints and ends `stopped` (not `interrupted`, which resumes)."""
    atomic_write_text(Path(folder) / STOP_REQUEST, json.dumps({"reason": reason[:1000], "at": time.time()}))


def stop_request(folder: Path) -> str | None:
    """The reason the job was asked to stop early, or None."""
    try:
        data = json.loads((Path(folder) / STOP_REQUEST).read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("reason") or "stopped early")[:1000] if isinstance(data, dict) else None


def job_token(secret: bytes, job_id: uuid.UUID | str) -> str:
    """A job's report credential, derived from the server secret: nothing to store, nothing to leak in SQL."""
    digest = hmac.new(secret, f"job:{job_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def job_token_matches(secret: bytes, job_id: uuid.UUID | str, token: str) -> bool:
    return hmac.compare_digest(job_token(secret, job_id), token)
