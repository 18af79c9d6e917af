"""The kinds of job, one table: what runs on the job side, what the service does around it, where it reports.

A new kind (the sweep trial next) is a row here plus a `JobKind` implementation; the reconciler, the
attempt rows, the lifecycle rules, the result files and the reports are the same for every kind.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from orchestrator.jobs.files import JobFile, JobResult, job_token
from orchestrator.jobs.tails import LogTails
from orchestrator.launchers.base import JobSpec, Resources
from orchestrator.lifecycle import Lifecycle

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from orchestrator.db.models import Job
    from orchestrator.db.session import Database
    from orchestrator.mlflow_bridge import MlflowBridge
    from orchestrator.schemas import JobReport
    from orchestrator.settings import Settings


@dataclass(frozen=True)
class KindEntry:
    name: str
    runner: str  # "module:function" run by `python -m orchestrator.jobs` (imports torch there, not here)
    handler: str  # "module:attribute" of the service-side JobKind
    queue: str  # launcher queue: evaluations have their own local job slots
    collection: str  # REST collection under /api/v1 (reports go to /<collection>/<id>/reports)


KINDS: dict[str, KindEntry] = {
    "train": KindEntry("train", "orchestrator.jobs.train:run", "orchestrator.runs:TRAIN", "train", "runs"),
    "trial": KindEntry("trial", "orchestrator.jobs.train:run", "orchestrator.sweeps.kind:TRIAL", "train", "runs"),
    "search": KindEntry(
        "search", "orchestrator.jobs.search:run", "orchestrator.sweeps.search:SEARCH", "train", "searches"
    ),
    "evaluate": KindEntry(
        "evaluate", "orchestrator.jobs.evaluate:run", "orchestrator.evaluations:EVALUATE", "eval", "evaluations"
    ),
}
if TYPE_CHECKING:
    JobKindName = str
else:
    JobKindName = Literal[tuple(KINDS)]


@dataclass(frozen=True)
class Context:
    """What the service side of a kind may use besides the session."""

    settings: Settings
    mlflow: MlflowBridge | None
    tails: LogTails = field(default_factory=LogTails)  # what the running hooks have read of job logs

    def job_file(
        self, job: Job, payload: dict[str, Any], mlflow_experiment_id: str | None, mlflow_run_id: str | None
    ) -> JobFile:
        """The job file of `job`: its kind's payload, where it reports, its token, its MLflow ids."""
        return JobFile(
            kind=job.kind,
            job_id=str(job.id),
            payload=payload,
            api_url=self.settings.jobs_api_url,
            report_path=f"/api/v1/{KINDS[job.kind].collection}/{job.id}/reports",
            token=job_token(self.settings.secret, job.id),
            backend=job.launcher,
            mlflow_tracking_uri=self.settings.job_mlflow_tracking_uri
            or (self.mlflow.tracking_uri if self.mlflow else self.settings.tracking_uri),
            mlflow_experiment_id=mlflow_experiment_id,
            mlflow_run_id=mlflow_run_id,
        )


class JobKind(Protocol):
    """The service side of one kind of job; every hook runs inside the caller's transaction."""

    lifecycle: Lifecycle

    def prepare(self, ctx: Context, session: Session, job: Job, attempt: int) -> JobFile:
        """The job file for this attempt (payload, MLflow ids); may create the job's MLflow run."""
        ...

    def may_launch(self, ctx: Context, session: Session, job: Job) -> str | None:
        """None to launch the queued job now; else why it waits (the hook may also end it, e.g. a budget)."""
        ...

    def array_group(self, ctx: Context, session: Session, job: Job) -> tuple[str, int] | None:
        """Queued jobs with the same group key go out as one array (where the launcher takes arrays), running
        at most the given number at once; None sends the job alone."""
        ...

    def housekeeping(self, ctx: Context, db: Database) -> list[str]:
        """Once per reconciler pass, after the jobs (a sweep closes and reports itself); returns errors."""
        ...

    def has_news(self, ctx: Context, folder: str, launcher: str) -> bool:
        """Whether the files `running` reads hold anything it has not acted on (read without a lock, outside
        any transaction). While this is False and the scheduler's word is unchanged, the reconciler skips the
        job's locking transaction, so a pass costs little per healthy running job."""
        ...

    def running(self, ctx: Context, session: Session, job: Job, attempt: int) -> None:
        """Called while the job runs, on passes where `has_news` or the scheduler's word says something
        changed (e.g. record checkpoints from the job's own log)."""
        ...

    def completed(self, ctx: Context, session: Session, job: Job, attempt: int, result: JobResult) -> tuple[bool, str]:
        """The job exited 0 with a completed result: record it; (succeeded?, the reason to log)."""
        ...

    def retry_failure(self, job: Job) -> str | None:
        """How a failed attempt is retried ("retrying as attempt 2 of 3"), or None when failures are final."""
        ...

    def report(self, ctx: Context, session: Session, job: Job, report: JobReport, actor: str) -> None:
        """What a report means beyond the lifecycle (progress, checkpoints)."""
        ...

    def terminal(self, session: Session, job: Job, actor: str) -> None:
        """The job has just reached a terminal state."""
        ...


class KindDefaults:
    """What a kind does where it has nothing to add: launch now, alone; no bookkeeping; failures final."""

    def may_launch(self, ctx: Context, session: Session, job: Job) -> str | None:
        return None

    def array_group(self, ctx: Context, session: Session, job: Job) -> tuple[str, int] | None:
        return None

    def housekeeping(self, ctx: Context, db: Database) -> list[str]:
        return []

    def has_news(self, ctx: Context, folder: str, launcher: str) -> bool:
        return False

    def running(self, ctx: Context, session: Session, job: Job, attempt: int) -> None:
        return None

    def retry_failure(self, job: Job) -> str | None:
        return None

    def report(self, ctx: Context, session: Session, job: Job, report: JobReport, actor: str) -> None:
        return None

    def terminal(self, session: Session, job: Job, actor: str) -> None:
        return None


@functools.cache
def handler(kind: str) -> JobKind:
    module_name, _, attribute = KINDS[kind].handler.partition(":")
    found: JobKind = getattr(importlib.import_module(module_name), attribute)
    return found


def job_spec(job_id: str, kind: str, folder: Path, resources: dict[str, Any], attempt: int, python: str) -> JobSpec:
    """The command every launcher starts for one attempt of a job: the job runner on the job's folder."""
    return JobSpec(
        job_id=job_id,
        attempt=attempt,
        name=f"orch-{kind}-{job_id[:8]}",
        argv=[python, "-m", "orchestrator.jobs", str(folder), "--attempt", str(attempt)],
        workdir=folder,
        resources=Resources.model_validate(resources),
    )
