"""Dry-run launcher: accepts every job and starts none (rehearsing a submission end to end).

Its jobs end at once as cancelled ("nothing was started"), so a dry-run job and its MLflow run reach a
terminal state instead of waiting for a process that will never run.
"""

from __future__ import annotations

import shlex

from orchestrator.launchers.base import JobSpec, JobState, JobStatus
from orchestrator.settings import Settings

NOTHING_STARTED = JobStatus(JobState.CANCELLED, reason="dry-run launcher: nothing was started")


class DryRunLauncher:
    name = "dryrun"

    def render(self, spec: JobSpec) -> str:
        return "# dryrun launcher: nothing is started\n" + shlex.join(spec.argv)

    def submit(self, spec: JobSpec) -> str:
        return f"dryrun-{spec.key}"

    def poll(self, job_id: str) -> JobStatus:
        return NOTHING_STARTED

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return dict.fromkeys(job_ids, NOTHING_STARTED)

    def cancel(self, job_id: str) -> None:
        pass

    def logs(self, job_id: str, tail: int = 200) -> str:
        return ""

    def capacity(self) -> int | None:
        return None


def from_settings(settings: Settings, queue: str) -> DryRunLauncher:
    return DryRunLauncher()
