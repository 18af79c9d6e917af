"""Local launcher: detached subprocesses on this machine with a concurrency limit (the embedded default).

Each job runs under `supervise` in its own session; a small JSON file per job in the state folder
(pid, process start time, exit-file, log) lets a restarted service find it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.jobs.files import EXIT_INTERRUPTED
from orchestrator.launchers.base import JobSpec, JobState, JobStatus, LauncherError
from orchestrator.settings import Settings
from trainer.files import atomic_write_text


def _start_ticks(pid: int) -> int | None:
    """Process start time (clock ticks since boot): tells a live job from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, ticks: int | None) -> bool:
    current = _start_ticks(pid)
    if current is None or (ticks is not None and current != ticks):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class LocalLauncher:
    name = "local"

    def __init__(self, state_dir: Path, max_concurrent: int = 1, python: str = sys.executable) -> None:
        self.state_dir = Path(state_dir)
        self.max_concurrent = max_concurrent
        self.python = python

    def _meta_path(self, job_id: str) -> Path:
        return self.state_dir / f"{job_id}.json"

    def _meta(self, job_id: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._meta_path(job_id).read_text())
            return data
        except (OSError, ValueError):
            return None

    def command(self, spec: JobSpec) -> list[str]:
        exit_file = self.state_dir / f"{spec.key}.exit"
        return [self.python, "-m", "orchestrator.launchers.supervise", "--exit-file", str(exit_file), "--", *spec.argv]

    def render(self, spec: JobSpec) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items()))
        line = shlex.join(self.command(spec))
        return (
            f"# local launcher: detached process, log {spec.log_dir}/attempt-{spec.attempt}.log\ncd {spec.workdir}\n"
            + (f"{env} {line}" if env else line)
        )

    def submit(self, spec: JobSpec) -> str:
        job_id = spec.key
        if self._meta(job_id) is not None:
            return job_id  # submitted before a crash: never start it twice
        self.state_dir.mkdir(parents=True, exist_ok=True)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = spec.log_dir / f"attempt-{spec.attempt}.log"
        env = {**os.environ, **spec.env, "ORCH_LOCAL_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"}
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    self.command(spec),
                    cwd=spec.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
        except OSError as exc:
            raise LauncherError(f"could not start {spec.argv[0]}: {exc}") from exc
        meta = {
            "pid": proc.pid,
            "start_ticks": _start_ticks(proc.pid),
            "log": str(log_path),
            "exit_file": str(self.state_dir / f"{job_id}.exit"),
            "started_at": datetime.now(UTC).isoformat(),
        }
        atomic_write_text(self._meta_path(job_id), json.dumps(meta))
        return job_id

    def poll(self, job_id: str) -> JobStatus:
        meta = self._meta(job_id)
        if meta is None:
            return JobStatus(JobState.LOST, reason="no record of this local job")
        started = datetime.fromisoformat(meta["started_at"])
        exit_file = Path(meta["exit_file"])
        if exit_file.exists():
            record = json.loads(exit_file.read_text())
            code = int(record["exit_code"])
            ended = datetime.fromtimestamp(record["ended_at"], UTC)
            if (self.state_dir / f"{job_id}.cancel").exists():
                state, reason = JobState.CANCELLED, "cancelled"
            elif code == 0:
                state, reason = JobState.COMPLETED, None
            elif code == EXIT_INTERRUPTED:
                state, reason = JobState.PREEMPTED, "interrupted: checkpoint written, resume to continue"
            else:
                state, reason = JobState.FAILED, f"exit code {code}"
            return JobStatus(state, code, reason, host=os.uname().nodename, started_at=started, ended_at=ended)
        if _alive(int(meta["pid"]), meta.get("start_ticks")):
            return JobStatus(JobState.RUNNING, host=os.uname().nodename, started_at=started)
        return JobStatus(JobState.LOST, reason="process gone without an exit status (killed?)", started_at=started)

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: self.poll(job_id) for job_id in job_ids}

    def cancel(self, job_id: str) -> None:
        meta = self._meta(job_id)
        if meta is None:
            return
        (self.state_dir / f"{job_id}.cancel").touch()
        pid = int(meta["pid"])
        if _alive(pid, meta.get("start_ticks")):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)  # the trainer checkpoints and exits at the end of its step

    def logs(self, job_id: str, tail: int = 200) -> str:
        meta = self._meta(job_id)
        if meta is None:
            return ""
        try:
            with open(meta["log"], errors="replace") as handle:
                return "".join(deque(handle, maxlen=tail))
        except OSError:
            return ""

    def running(self) -> int:
        count = 0
        for path in self.state_dir.glob("*.json"):
            job_id = path.stem
            if not (self.state_dir / f"{job_id}.exit").exists():
                meta = self._meta(job_id)
                if meta and _alive(int(meta["pid"]), meta.get("start_ticks")):
                    count += 1
        return count

    def capacity(self) -> int | None:
        return max(self.max_concurrent - self.running(), 0)


def from_settings(settings: Settings, queue: str) -> LocalLauncher:
    """Training and evaluation jobs get their own job slots (and state folders)."""
    if queue == "eval":
        return LocalLauncher(settings.home.resolve() / "local-eval-jobs", settings.local_eval_max_concurrent)
    return LocalLauncher(settings.home.resolve() / "local-jobs", settings.local_max_concurrent)
