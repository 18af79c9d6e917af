"""The trials of a Ray Tune search, seen as a backend: the search job (Ray Tune) is their scheduler.

A trial of a search is a run the reconciler drives like any other (attempts, lifecycle, result files,
checkpoints, MLflow), but no scheduler the service talks to starts it: the search job's Tune trainable does.
The two meet in the trial's folder, under `tune/`:

* `submit` writes `launch-N.json`: attempt N may run. The trainable waits for it, then starts
  `python -m orchestrator.jobs FOLDER --attempt N`, the job runner of every run.
* the trainable writes `attempt-N.json`: running (host, pid, start), rewritten every few seconds as a sign
  of life, then ended (exit code, end).
* `cancel` writes `cancel-N`: the trainable stops the runner (SIGTERM: checkpoint, exit 75).

`poll` reads the attempt file: absent is pending; running but silent for `STALE_S` is lost (the search job or
its trial actor died: the reconciler requeues the trial, and the search, restored, runs it again); ended is
completed, preempted (75) or failed by its exit code. Nothing here imports Ray: the service never does.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.jobs.files import EXIT_INTERRUPTED
from orchestrator.launchers.base import JobSpec, JobState, JobStatus, LauncherError
from orchestrator.settings import Settings
from trainer.files import atomic_write_text

MAILBOX = "tune"
METRICS_FILE = "metrics.jsonl"  # the trainable's objective per epoch, which the service records
#: A running trial rewrites its attempt file this often; silent for STALE_S, it is lost.
ALIVE_EVERY_S, STALE_S = 5.0, 90.0


def mailbox(folder: Path) -> Path:
    return Path(folder) / MAILBOX


def launch_path(folder: Path, attempt: int) -> Path:
    return mailbox(folder) / f"launch-{attempt}.json"


def attempt_path(folder: Path, attempt: int) -> Path:
    return mailbox(folder) / f"attempt-{attempt}.json"


def cancel_path(folder: Path, attempt: int) -> Path:
    return mailbox(folder) / f"cancel-{attempt}"


def launched_attempt(folder: Path) -> int | None:
    """The newest attempt the service has let run (the trainable runs that one)."""
    numbers = [int(p.stem.split("-")[1]) for p in mailbox(folder).glob("launch-*.json") if p.stem[7:].isdigit()]
    return max(numbers, default=None)


def closed_path(folder: Path) -> Path:
    return mailbox(folder) / "closed.json"


def close_mailbox(folder: Path, status: str, reason: str | None) -> None:
    """The service's side: the trial has ended (cancelled before it ran, say); its trainable stops waiting."""
    atomic_write_text(closed_path(folder), json.dumps({"status": status, "reason": reason}))


def write_attempt(folder: Path, attempt: int, state: str, **data: Any) -> None:
    """The trainable's side: the attempt's state ("running" or "ended")."""
    record = {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time(), **data}
    atomic_write_text(attempt_path(folder, attempt), json.dumps(record))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _time(value: Any) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if isinstance(value, int | float) else None


class TuneTrialLauncher:
    name = "tune"

    def __init__(self, runs_root: Path, stale_s: float = STALE_S) -> None:
        self.runs_root, self.stale_s = Path(runs_root), stale_s

    def _where(self, job_id: str) -> tuple[Path, int]:
        """A backend id is `<run id>:<attempt>`; anything else is refused (it names a folder)."""
        run_id, _, attempt = job_id.partition(":")
        try:
            return self.runs_root / str(uuid.UUID(run_id)), int(attempt)
        except ValueError as exc:
            raise LauncherError(f"not a search trial id: {job_id[:80]!r}") from exc

    def submit(self, spec: JobSpec) -> str:
        atomic_write_text(launch_path(spec.workdir, spec.attempt), json.dumps({"attempt": spec.attempt}))
        return f"{spec.job_id}:{spec.attempt}"

    def render(self, spec: JobSpec) -> str:
        return (
            "# run by its search's Ray Tune trainable once the service lets attempt "
            f"{spec.attempt} go ({MAILBOX}/launch-{spec.attempt}.json):\n"
            f"cd {spec.workdir} && {' '.join(spec.argv)}"
        )

    def poll(self, job_id: str) -> JobStatus:
        try:
            folder, attempt = self._where(job_id)
        except LauncherError as exc:
            return JobStatus(JobState.LOST, reason=str(exc))
        record = _read(attempt_path(folder, attempt))
        if record is None:
            return JobStatus(JobState.PENDING, reason="waiting for its search to start it")
        host, started = record.get("host"), _time(record.get("started_at"))
        if record.get("state") != "ended":
            silent = time.time() - float(record.get("at") or 0)
            if silent > self.stale_s:
                return JobStatus(JobState.LOST, reason=f"its search trial has been silent for {silent:.0f} s")
            return JobStatus(JobState.RUNNING, host=host, started_at=started)
        code = record.get("exit_code")
        code = int(code) if isinstance(code, int) else None
        ended = _time(record.get("ended_at"))
        if record.get("lost"):
            return JobStatus(JobState.LOST, None, "its search trial died with it", host, started, ended)
        if cancel_path(folder, attempt).exists() and code != 0:
            return JobStatus(JobState.CANCELLED, code, "cancelled", host, started, ended)
        if code == 0:
            return JobStatus(JobState.COMPLETED, 0, None, host, started, ended)
        if code == EXIT_INTERRUPTED:
            return JobStatus(JobState.PREEMPTED, code, "interrupted: checkpoint written", host, started, ended)
        return JobStatus(JobState.FAILED, code, f"exit code {code}", host, started, ended)

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: self.poll(job_id) for job_id in job_ids}

    def cancel(self, job_id: str) -> None:
        folder, attempt = self._where(job_id)
        atomic_write_text(cancel_path(folder, attempt), "cancelled\n")

    def logs(self, job_id: str, tail: int = 200) -> str:
        folder, attempt = self._where(job_id)
        try:
            with open(folder / "logs" / f"attempt-{attempt}.log", errors="replace") as handle:
                return "".join(deque(handle, maxlen=tail))
        except OSError:
            return ""

    def capacity(self) -> int | None:
        return None


def from_settings(settings: Settings, queue: str) -> TuneTrialLauncher:
    return TuneTrialLauncher(settings.runs_root)
