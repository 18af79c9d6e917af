"""The SQL side of the job layer, shared by every kind: lookups, transitions, events, attempts, reports.

Every function takes the caller's session: the caller owns the transaction, so a transition, its event and
whatever caused it commit together or not at all.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, selectinload, with_polymorphic

from orchestrator.db.models import Attempt, Base, Job, utcnow
from orchestrator.errors import ConflictError, InvalidInputError, NotFoundError, ReportRefusedError
from orchestrator.jobs.kinds import Context, handler
from orchestrator.launchers.base import JobState, JobStatus
from orchestrator.lifecycle import Status
from orchestrator.schemas import JobReport

J = TypeVar("J", bound=Job)


def parse_uuid(ident: str | uuid.UUID, what: str) -> uuid.UUID:
    """A UUID from a path parameter; anything else is simply not found (404), never a 500."""
    try:
        return ident if isinstance(ident, uuid.UUID) else uuid.UUID(str(ident))
    except ValueError as exc:
        raise NotFoundError(f"no {what} {ident!r}") from exc


def get_job(session: Session, model: type[J], ident: str | uuid.UUID, what: str, *, lock: bool = False) -> J:
    """A job of the given kind (Run, Evaluation, or Job for any) with its attempts loaded."""
    query = select(model).where(model.id == parse_uuid(ident, what)).options(selectinload(model.attempts))
    if lock:  # the jobs row is the lock of every kind (the kind's own table may be an outer join)
        query = query.with_for_update(of=Job.__table__)
    found = session.scalar(query)
    if found is None:
        raise NotFoundError(f"no {what} {ident!r}")
    return found


def lock_jobs(session: Session, ids: list[uuid.UUID]) -> list[Job]:
    """Jobs of any kind, attempts loaded, their rows locked together for the transaction, oldest first.
    PostgreSQL skips the rows another transaction holds (SKIP LOCKED) instead of waiting for them; on SQLite
    the writer lock the transaction took at BEGIN covers them all."""
    if not ids:
        return []
    every_kind = with_polymorphic(Job, "*")
    query = (
        select(every_kind)
        .where(every_kind.id.in_(ids))
        .options(selectinload(every_kind.attempts))
        .order_by(every_kind.created_at, every_kind.id)
        .with_for_update(of=Job.__table__, skip_locked=True)
    )
    return list(session.scalars(query))


EVENTS = Base.metadata.tables["events"]


class Identified(Protocol):
    """What an event names: a job loaded as an ORM object, or a run just inserted without one."""

    @property
    def id(self) -> uuid.UUID: ...


def record_event(
    session: Session,
    job: Identified,
    kind: str,
    actor: str,
    reason: str | None = None,
    *,
    from_status: str | None = None,
    to_status: str | None = None,
    **data: Any,
) -> None:
    """Append to the job's log at once, as plain SQL (events are never changed, so no ORM object is kept):
    pending changes are flushed first, so the job it names, and what it reports, precede it."""
    session.flush()
    session.execute(insert(EVENTS), [event_row(job.id, kind, actor, reason, from_status, to_status, data)])


def event_row(
    job_id: uuid.UUID,
    kind: str,
    actor: str,
    reason: str | None,
    from_status: str | None,
    to_status: str | None,
    data: dict[str, Any],
) -> dict[str, Any]:
    """An `events` row: what `record_event` appends, for callers that insert it with other rows."""
    return dict(
        job_id=job_id,
        kind=kind,
        actor=actor,
        reason=reason,
        from_status=from_status,
        to_status=to_status,
        data=data,
        at=utcnow(),
    )


def transition(session: Session, job: Job, target: Status, actor: str, reason: str | None = None, **data: Any) -> None:
    """Apply one lifecycle step of the job's kind and log it; refuses what the machine forbids (409)."""
    kind = handler(job.kind)
    current = Status(job.status)
    kind.lifecycle.check(current, target)
    job.status = target.value
    job.status_reason = reason
    now = utcnow()
    if target == Status.RUNNING and job.started_at is None:
        job.started_at = now
    if target.terminal:
        job.ended_at = now
    record_event(session, job, "transition", actor, reason, from_status=current.value, to_status=target.value, **data)
    if target.terminal:
        kind.terminal(session, job, actor)


def advance(session: Session, job: Job, target: Status, actor: str, reason: str | None, **data: Any) -> None:
    """Walk the allowed transitions to `target`, logging each (a poll can miss intermediate states)."""
    for step in handler(job.kind).lifecycle.path_to(Status(job.status), target):
        why = reason if step == target else f"(passed through) {reason or ''}"
        transition(session, job, step, actor, why, **data)


def cancel(session: Session, job: Job, actor: str, reason: str | None = None) -> None:
    """Queued jobs end at once; others end here too, and the reconciler stops their scheduler job."""
    if Status(job.status).terminal:
        raise ConflictError(f"{job.kind} job {job.id} is already {job.status}: terminal states never change")
    transition(session, job, Status.CANCELLED, actor, reason or "cancelled by user")


def current_attempt(job: Job) -> Attempt | None:
    return job.attempts[-1] if job.attempts else None


def close_attempt(attempt: Attempt, scheduler: JobStatus | None = None, reason: str | None = None) -> None:
    """End an attempt with its exit and accelerator-seconds (start to end, preempted time included)."""
    if attempt.state == "ended":
        return
    attempt.state = "ended"
    attempt.ended_at = (scheduler.ended_at if scheduler else None) or utcnow()
    if scheduler is not None:
        attempt.exit_code = scheduler.exit_code
        attempt.host = attempt.host or scheduler.host
        if attempt.started_at is None and scheduler.started_at is not None:
            attempt.started_at = scheduler.started_at
    attempt.exit_reason = (
        attempt.exit_reason or reason or (scheduler.reason or scheduler.state.value if scheduler else None)
    )
    attempt.accelerator_seconds = accelerator_seconds(attempt, attempt.ended_at)


def accelerator_seconds(attempt: Attempt, until: datetime) -> float:
    if attempt.started_at is None:
        return 0.0
    return max((until - attempt.started_at).total_seconds(), 0.0) * attempt.accelerators


def scheduler_restart(session: Session, job: Job, number: int, actor: str, reason: str) -> Attempt:
    """The scheduler restarted the job under the same job id (SLURM requeue): close the attempts before
    `number` and open attempt `number`, counting each restart as a requeue."""
    last = current_attempt(job)
    if last is None or number <= last.number:
        raise ConflictError(f"attempt {number} does not follow the job's attempts")
    attempt = last
    while attempt.number < number:
        close_attempt(attempt, JobStatus(JobState.PREEMPTED, reason=reason))
        job.requeues += 1
        attempt = Attempt(
            job=job,
            number=attempt.number + 1,
            backend=last.backend,
            backend_job_id=last.backend_job_id,
            accelerators=last.accelerators,
            state="pending",
            log_path=last.log_path,
        )
        session.add(attempt)
        record_event(session, job, "attempt", actor, reason, number=attempt.number, job_id=last.backend_job_id)
    status = Status(job.status)
    if status in (Status.SUBMITTED, Status.RUNNING):
        transition(session, job, Status.PREEMPTED, actor, reason)
    if Status(job.status) == Status.PREEMPTED:
        transition(session, job, Status.REQUEUED, actor, f"{reason} (requeue {job.requeues})")
    session.flush()
    return attempt


def apply_report(ctx: Context, session: Session, job: Job, report: JobReport) -> None:
    """A job's own account of itself. Success is never taken from a report: the reconciler settles a job
    once its scheduler says it has exited and its result file says it completed."""
    actor = f"job:attempt-{report.attempt}"
    if Status(job.status).terminal and report.kind != "checkpoint":
        return  # a late report of a cancelled or settled job changes nothing
    attempt = current_attempt(job)
    if attempt is None:
        raise ConflictError(f"{job.kind} job {job.id} has no attempt yet")
    if report.attempt == attempt.number + 1 and report.kind == "start" and attempt.backend == "slurm":
        attempt = scheduler_restart(session, job, report.attempt, actor, "scheduler requeued the job")
    elif report.attempt != attempt.number:
        raise InvalidInputError(
            f"attempt {report.attempt} is not the job's current attempt ({attempt.number})", field="attempt"
        )
    if report.job_id is not None and attempt.backend_job_id is not None and report.job_id != attempt.backend_job_id:
        raise ReportRefusedError(  # scheduler ids come from the launcher's submission, never from a report
            f"the report names scheduler job {report.job_id!r}; attempt {attempt.number} is job "
            f"{attempt.backend_job_id!r}",
            field="job_id",
        )
    job.last_heartbeat_at = utcnow()
    if report.kind == "start":
        attempt.state, attempt.host = "running", report.host or attempt.host
        attempt.started_at = attempt.started_at or utcnow()
        status = Status(job.status)
        if status in (Status.SUBMITTED, Status.REQUEUED):
            transition(session, job, Status.RUNNING, actor, f"started on {report.host}")
        elif status == Status.PREEMPTED:
            transition(session, job, Status.REQUEUED, actor, "scheduler requeued the job")
            transition(session, job, Status.RUNNING, actor, f"started on {report.host}")
    elif report.kind == "end":
        record_event(session, job, "job_end", actor, report.reason, status=report.status, iteration=report.iteration)
    handler(job.kind).report(ctx, session, job, report, actor)
