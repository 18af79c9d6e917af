"""What every kind of job offers over REST, added to the runs and evaluations routers by one factory:
attempts, events, log tail, cancel, and the report endpoint a job calls with its own token.

Annotations here are evaluated at definition (no `from __future__ import annotations`): FastAPI reads the
route parameters of the functions the factory defines, whose path-parameter type is local to it.
"""

import contextlib
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query
from fastapi.responses import PlainTextResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Admin, AppState, JobCaller, PageToken, Reader, SessionDep, StateDep
from orchestrator.db.models import Event, Job
from orchestrator.errors import NotFoundError, ReportRefusedError
from orchestrator.jobs.kinds import KINDS, Context
from orchestrator.jobs.records import apply_report, cancel, get_job, record_event
from orchestrator.launchers.base import LauncherError
from orchestrator.pages import decode_sequence
from orchestrator.schemas import AttemptPublic, EventPublic, JobReport, Page

J = TypeVar("J", bound=Job)
P = TypeVar("P")


def attempts_of(job: Job) -> list[AttemptPublic]:
    return [AttemptPublic.model_validate(a, from_attributes=True) for a in job.attempts]


def events_of(session: Session, job: Job, page_size: int, page_token: str | None) -> Page[EventPublic]:
    query = select(Event).where(Event.job_id == job.id)
    if page_token:
        query = query.where(Event.id > decode_sequence(page_token))
    rows = list(session.scalars(query.order_by(Event.id).limit(page_size + 1)))
    more = len(rows) > page_size
    rows = rows[:page_size]
    return Page[EventPublic](
        items=[EventPublic.model_validate(e, from_attributes=True) for e in rows],
        next_page_token=str(rows[-1].id) if more and rows else None,
    )


def job_logs(state: AppState, job: Job, tail: int, attempt: int | None) -> str:
    chosen = [a for a in job.attempts if attempt is None or a.number == attempt]
    if not chosen:
        raise NotFoundError(f"{job.id} has no attempt {attempt}" if attempt else f"{job.id} has not started")
    last = chosen[-1]
    if not last.backend_job_id:
        return ""
    return state.launchers.get(last.backend, KINDS[job.kind].queue).logs(last.backend_job_id, tail)


def cancel_job(state: AppState, model: type[J], ident: str, what: str, actor: str, public: Callable[[J], P]) -> P:
    """Cancel (409 if already terminal), then ask the scheduler to stop the job at once; the reconciler
    retries the stop on every pass and closes the attempt when the job has ended."""
    with state.db.transaction() as session:
        job = get_job(session, model, ident, what, lock=True)
        cancel(session, job, actor)
        attempt = job.attempts[-1] if job.attempts else None
        result = public(job)
        queue = KINDS[job.kind].queue
    if attempt is not None and attempt.backend_job_id and attempt.state != "ended":
        with contextlib.suppress(LauncherError):
            state.launchers.get(attempt.backend, queue).cancel(attempt.backend_job_id)
    return result


def accept_report(state: AppState, model: type[J], job_id: uuid.UUID, what: str, body: JobReport) -> None:
    try:
        with state.db.transaction() as session:
            job = get_job(session, model, job_id, what, lock=True)
            apply_report(Context(state.settings, state.mlflow), session, job, body)
    except ReportRefusedError as exc:
        with state.db.transaction() as session:
            job = get_job(session, model, job_id, what, lock=True)
            record_event(session, job, "report_refused", f"job:attempt-{body.attempt}", exc.detail, report=body.kind)
        raise


def add_job_routes(
    router: APIRouter, model: type[J], what: str, public: Callable[[J, AppState], Any], public_model: Any
) -> None:
    """The routes every kind of job has under its collection, `/<collection>/{<what>_id}/...`."""
    ident_type = Annotated[str, Path(alias=f"{what}_id", description=f"The {what}'s id.")]
    item = f"/{{{what}_id}}"

    @router.post(f"{item}/cancel", response_model=public_model, summary=f"Cancel a {what} (409 if it already ended)")
    def cancel_(ident: ident_type, state: StateDep, principal: Admin) -> Any:
        return cancel_job(state, model, ident, what, f"api:{principal.name}", lambda job: public(job, state))

    @router.get(f"{item}/attempts", response_model=list[AttemptPublic], summary=f"Scheduler submissions of a {what}")
    def attempts(ident: ident_type, session: SessionDep, _: Reader) -> list[AttemptPublic]:
        return attempts_of(get_job(session, model, ident, what))

    @router.get(f"{item}/events", response_model=Page[EventPublic], summary=f"The {what}'s append-only event log")
    def events(
        ident: ident_type,
        session: SessionDep,
        _: Reader,
        page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
        page_token: PageToken = None,
    ) -> Page[EventPublic]:
        return events_of(session, get_job(session, model, ident, what), page_size, page_token)

    @router.get(f"{item}/logs", response_class=PlainTextResponse, summary="Tail of the latest attempt's log")
    def logs(
        ident: ident_type,
        session: SessionDep,
        state: StateDep,
        _: Reader,
        tail: Annotated[int, Query(ge=1, le=10_000)] = 200,
        attempt: Annotated[int | None, Query(ge=1)] = None,
    ) -> str:
        return job_logs(state, get_job(session, model, ident, what), tail, attempt)

    @router.post(f"{item}/reports", status_code=204, summary=f"Report from a {what}'s job (with its own token)")
    def report(ident: ident_type, body: JobReport, state: StateDep, caller: JobCaller) -> None:
        accept_report(state, model, caller, what, body)
