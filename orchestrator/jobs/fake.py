"""A scheduler in memory for tests and benchmarks (submitit's FakeExecutor idea).

`FakeLauncher` implements the launcher interface; its jobs do nothing until the test says what happened to
them: started on a node, finished (leaving the result file a real job would leave), preempted, killed
without a trace, restarted by the scheduler under the same id, or never submitted at all. The reconciler
cannot tell it from a real backend, so every branch of its settle logic runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.jobs.files import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, write_result
from orchestrator.launchers.base import JobSpec, JobState, JobStatus, LauncherError


@dataclass
class FakeJob:
    spec: JobSpec
    status: JobStatus = field(default_factory=lambda: JobStatus(JobState.PENDING))
    restarts: int = 0

    @property
    def attempt(self) -> int:
        """The attempt the job side would report: the launcher's number plus the scheduler's restarts."""
        return self.spec.attempt + self.restarts


class FakeLauncher:
    name = "fake"

    def __init__(self, capacity: int | None = None, host: str = "fake-node") -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.cancelled: list[str] = []
        self.host = host
        self.free = capacity
        self.refuse_next: str | None = None  # the next submit raises LauncherError with this message
        self.ignore_cancel = False  # a scheduler that is slow to act on scancel
        self.before_submit: Callable[[JobSpec], None] | None = None  # e.g. a crash or a cancel mid-submission
        self.arrays: list[tuple[list[str], int]] = []  # (job ids, parallelism) of every array submitted

    # ------------------------------------------------------------------ the launcher interface

    def submit(self, spec: JobSpec) -> str:
        if self.refuse_next is not None:
            message, self.refuse_next = self.refuse_next, None
            raise LauncherError(message)
        if self.before_submit is not None:
            self.before_submit(spec)
        job_id = f"fake-{spec.key}"
        if job_id not in self.jobs:  # idempotent on the key, like every backend
            self.jobs[job_id] = FakeJob(spec)
        return job_id

    def poll(self, job_id: str) -> JobStatus:
        job = self.jobs.get(job_id)
        if job is None:
            return JobStatus(JobState.LOST, reason="no record of this fake job")
        return replace(job.status, restarts=job.restarts)

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: self.poll(job_id) for job_id in job_ids}

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        job = self.jobs.get(job_id)
        if job is not None and not job.status.state.ended and not self.ignore_cancel:
            job.status = self._ended(job, JobState.CANCELLED, None, "cancelled", ran=job.status.started_at is not None)

    def logs(self, job_id: str, tail: int = 200) -> str:
        return f"fake log of {job_id}\n"

    def render(self, spec: JobSpec) -> str:
        return f"# fake launcher\n{' '.join(spec.argv)}"

    def capacity(self) -> int | None:
        if self.free is None:
            return None
        running = sum(1 for job in self.jobs.values() if not job.status.state.ended)
        return max(self.free - running, 0)

    # ------------------------------------------------------------------ what happens to the jobs

    def job_of(self, job_uuid: object) -> str:
        """The scheduler id of the latest submission for an orchestrator job."""
        found = [job_id for job_id, job in self.jobs.items() if job.spec.job_id == str(job_uuid)]
        if not found:
            raise KeyError(f"no fake job for {job_uuid}")
        return max(found, key=lambda job_id: self.jobs[job_id].spec.attempt)

    def start(self, job_id: str, started_at: datetime | None = None) -> None:
        job = self.jobs[job_id]
        job.status = JobStatus(JobState.RUNNING, host=self.host, started_at=started_at or datetime.now(UTC))

    def finish(self, job_id: str, outcome: str = "completed", reason: str | None = None, **result: Any) -> None:
        """The job exits as a job runner does: result file first (unless outcome is None), then the exit code.
        outcome: completed (exit 0), interrupted (exit 75), failed (exit 1), or None (exit 0, no file)."""
        job = self.jobs[job_id]
        if outcome is not None:
            write_result(job.spec.workdir, job.attempt, outcome, reason=reason, **result)
        code = {"completed": EXIT_COMPLETED, "interrupted": EXIT_INTERRUPTED, None: EXIT_COMPLETED}.get(
            outcome, EXIT_FAILED
        )
        state = {EXIT_COMPLETED: JobState.COMPLETED, EXIT_INTERRUPTED: JobState.PREEMPTED}.get(code, JobState.FAILED)
        job.status = self._ended(job, state, code, reason or (None if code == 0 else f"exit code {code}"))

    def lose(self, job_id: str) -> None:
        """Killed without an exit status or a result file (a node that vanished, kill -9)."""
        job = self.jobs[job_id]
        job.status = self._ended(job, JobState.LOST, None, "process gone without an exit status")

    def restart(self, job_id: str) -> None:
        """The scheduler requeues the job under the same id (scontrol requeue): queued again."""
        job = self.jobs[job_id]
        job.restarts += 1
        job.status = JobStatus(JobState.PENDING, reason="requeued")

    def _ended(
        self, job: FakeJob, state: JobState, code: int | None, reason: str | None, ran: bool = True
    ) -> JobStatus:
        """An ended status; a job that ends without having been started explicitly ran for a second."""
        started = job.status.started_at or (datetime.now(UTC) - timedelta(seconds=1) if ran else None)
        return JobStatus(state, code, reason, host=job.status.host, started_at=started, ended_at=datetime.now(UTC))


class FakeArrayLauncher(FakeLauncher):
    """The fake scheduler with job arrays (as SLURM): an array is its tasks, each a job of its own."""

    def submit_array(self, specs: list[JobSpec], parallelism: int) -> list[str]:
        ids = [self.submit(spec) for spec in specs]
        self.arrays.append((ids, parallelism))
        return ids

    def one_at_a_time(self) -> Any:
        """The same jobs behind a launcher without arrays (as the local one), for harnesses with both."""
        fake = self

        class OneAtATime:
            def __getattr__(self, name: str) -> Any:
                if name == "submit_array":
                    raise AttributeError(name)
                return getattr(fake, name)

        return OneAtATime()
