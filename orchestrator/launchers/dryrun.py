"""Dry-run launcher: accepts every job and starts none (API load tests, rehearsing a submission)."""

from __future__ import annotations

import shlex

from orchestrator.launchers.base import JobSpec, JobState, JobStatus


class DryRunLauncher:
    name = "dryrun"

    def render(self, spec: JobSpec) -> str:
        return "# dryrun launcher: nothing is started\n" + shlex.join(spec.argv)

    def submit(self, spec: JobSpec) -> str:
        return f"dryrun-{spec.key}"

    def poll(self, job_id: str) -> JobStatus:
        return JobStatus(JobState.PENDING, reason="dry run: never starts")

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        status = JobStatus(JobState.PENDING, reason="dry run: never starts")
        return dict.fromkeys(job_ids, status)

    def cancel(self, job_id: str) -> None:
        pass

    def logs(self, job_id: str, tail: int = 200) -> str:
        return ""

    def capacity(self) -> int | None:
        return None
