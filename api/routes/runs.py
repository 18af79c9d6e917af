"""Runs: submit (with Idempotency-Key and dry run), list, show, cancel, retry, attempts, checkpoints,
events, log tail, and the job-report endpoint that jobs call with their run token."""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select

from api.deps import Admin, Reader, RunToken, SessionDep, StateDep
from api.idempotency import idempotent_post
from orchestrator.db.models import Checkpoint, Event, Run
from orchestrator.launchers.base import LauncherError
from orchestrator.lifecycle import RunStatus
from orchestrator.mlflow_bridge import MlflowBridge
from orchestrator.schemas import (
    AttemptPublic,
    CheckpointPublic,
    DryRun,
    EventPublic,
    Page,
    RunCreate,
    RunPublic,
    RunReport,
)
from orchestrator.service import (
    InvalidInputError,
    NotFoundError,
    apply_report,
    get_run,
    job_spec,
    list_runs,
    request_cancel,
    resolve_config,
    retry_run,
    run_token_matches,
    submit_run,
)

router = APIRouter(prefix="/runs", tags=["runs"])
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", description="Repeat a POST safely: the same key replays the first reply."),
]


def run_public(run: Run, mlflow: MlflowBridge) -> RunPublic:
    return RunPublic(
        id=run.id,
        experiment=run.experiment.name,
        name=run.name,
        method=run.method,
        status=RunStatus(run.status),
        status_reason=run.status_reason,
        launcher=run.launcher,
        resources=run.resources,
        config_hash=run.config_hash,
        config=run.config,
        requeues=run.requeues,
        retry_of=run.retry_of_id,
        output_dir=run.output_dir,
        progress=run.progress,
        mlflow_run_id=run.mlflow_run_id,
        mlflow_url=mlflow.run_url(run.mlflow_experiment_id, run.mlflow_run_id),
        created_by=run.created_by,
        created_at=run.created_at,
        updated_at=run.updated_at,
        started_at=run.started_at,
        ended_at=run.ended_at,
        attempts=[AttemptPublic.model_validate(a, from_attributes=True) for a in run.attempts],
    )


def _dump(model: Any) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json")
    return data


@router.post(
    "",
    status_code=202,
    response_model=RunPublic | DryRun,
    summary="Submit a pretraining run",
    description="Validates the config with the trainer's own classes, records the run as `queued` and returns "
    "202; the reconciler launches it. `dry_run=true` renders the submission (sbatch script, Ray spec or "
    "command line) and writes nothing.",
    responses={202: {"description": "Accepted: the run, status queued"}, 422: {"description": "Invalid config"}},
)
def submit(
    body: RunCreate,
    state: StateDep,
    principal: Admin,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    dry_run: Annotated[bool, Query(description="Render what would be submitted; no side effects.")] = False,
) -> JSONResponse:
    if dry_run:
        cfg = resolve_config(body)
        launcher_name = body.launcher or state.settings.default_launcher
        preview = Run(
            id=uuid.UUID(int=0),
            name=body.name or cfg.default_run_name(),
            resources=body.resources.model_dump(mode="json"),
            output_dir=str(state.settings.runs_root / "<run-id>" / "train"),
        )
        try:
            rendered = state.launchers.get(launcher_name).render(job_spec(preview, 1, state.settings.python))
        except LauncherError as exc:
            raise InvalidInputError(str(exc), field="launcher") from exc
        dry = DryRun(
            config=cfg.model_dump(mode="json"),
            config_hash=cfg.config_hash(),
            launcher=launcher_name,
            rendered=rendered,
            resources=body.resources.model_dump(mode="json"),
        )
        return JSONResponse(_dump(dry), status_code=200)

    def work(session: Any) -> tuple[int, dict[str, Any]]:
        run = submit_run(session, state.settings, body, principal.name)
        session.flush()
        session.refresh(run, ["attempts", "experiment"])
        return 202, _dump(run_public(run, state.mlflow))

    return idempotent_post(state, principal, request, idempotency_key, body.model_dump(mode="json"), work)


@router.get("", response_model=Page[RunPublic], summary="List runs, newest first (cursor pagination)")
def list_(
    session: SessionDep,
    state: StateDep,
    _: Reader,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: str | None = None,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    experiment: str | None = None,
) -> Page[RunPublic]:
    runs, token = list_runs(session, page_size=page_size, page_token=page_token, status=status, experiment=experiment)
    return Page[RunPublic](items=[run_public(r, state.mlflow) for r in runs], next_page_token=token)


@router.get("/{run_id}", response_model=RunPublic, summary="Show one run with its attempts")
def show(run_id: str, session: SessionDep, state: StateDep, _: Reader) -> RunPublic:
    return run_public(get_run(session, run_id), state.mlflow)


@router.post("/{run_id}/cancel", response_model=RunPublic, summary="Cancel a run (409 if it already ended)")
def cancel(run_id: str, state: StateDep, principal: Admin) -> RunPublic:
    with state.db.transaction() as session:
        run = get_run(session, run_id, lock=True)
        request_cancel(session, run, f"api:{principal.name}")
        job = run.attempts[-1] if run.attempts else None
        public = run_public(run, state.mlflow)
    if job is not None and job.backend_job_id and job.state != "ended":
        with contextlib.suppress(LauncherError):  # stop it now; the reconciler retries and closes the attempt
            state.launchers.get(job.backend).cancel(job.backend_job_id)
    return public


@router.post(
    "/{run_id}/retry",
    status_code=202,
    response_model=RunPublic,
    summary="Start a new run with the same config (terminal states never change)",
)
def retry(
    run_id: str, state: StateDep, principal: Admin, request: Request, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    def work(session: Any) -> tuple[int, dict[str, Any]]:
        new = retry_run(session, state.settings, get_run(session, run_id, lock=True), f"api:{principal.name}")
        session.flush()
        session.refresh(new, ["attempts", "experiment"])
        return 202, _dump(run_public(new, state.mlflow))

    return idempotent_post(state, principal, request, idempotency_key, {"retry": run_id}, work)


@router.get("/{run_id}/attempts", response_model=list[AttemptPublic], summary="Scheduler submissions of a run")
def attempts(run_id: str, session: SessionDep, _: Reader) -> list[AttemptPublic]:
    return [AttemptPublic.model_validate(a, from_attributes=True) for a in get_run(session, run_id).attempts]


@router.get("/{run_id}/checkpoints", response_model=list[CheckpointPublic], summary="Checkpoints a run recorded")
def checkpoints(run_id: str, session: SessionDep, _: Reader) -> list[CheckpointPublic]:
    run = get_run(session, run_id)
    rows = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run.id).order_by(Checkpoint.step))
    return [CheckpointPublic.model_validate(c, from_attributes=True) for c in rows]


@router.get("/{run_id}/events", response_model=Page[EventPublic], summary="The run's append-only event log")
def events(
    run_id: str,
    session: SessionDep,
    _: Reader,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: str | None = None,
) -> Page[EventPublic]:
    run = get_run(session, run_id)
    query = select(Event).where(Event.run_id == run.id)
    if page_token:
        if not page_token.isdigit():
            raise InvalidInputError("page_token is not a token this service issued", field="page_token")
        query = query.where(Event.id > int(page_token))
    rows = list(session.scalars(query.order_by(Event.id).limit(page_size + 1)))
    more = len(rows) > page_size
    rows = rows[:page_size]
    return Page[EventPublic](
        items=[EventPublic.model_validate(e, from_attributes=True) for e in rows],
        next_page_token=str(rows[-1].id) if more and rows else None,
    )


@router.get("/{run_id}/logs", response_class=PlainTextResponse, summary="Tail of the latest attempt's log")
def logs(
    run_id: str,
    session: SessionDep,
    state: StateDep,
    _: Reader,
    tail: Annotated[int, Query(ge=1, le=10_000)] = 200,
    attempt: Annotated[int | None, Query(ge=1)] = None,
) -> str:
    run = get_run(session, run_id)
    chosen = [a for a in run.attempts if attempt is None or a.number == attempt]
    if not chosen:
        raise NotFoundError(f"run {run_id} has no attempt {attempt}" if attempt else f"run {run_id} has not started")
    job = chosen[-1]
    if not job.backend_job_id:
        return ""
    return state.launchers.get(job.backend).logs(job.backend_job_id, tail)


@router.post(
    "/{run_id}/reports",
    status_code=204,
    summary="Progress report from a job (authenticated with the run's own token)",
    include_in_schema=True,
)
def report(run_id: str, body: RunReport, state: StateDep, token: RunToken) -> None:
    try:
        ident = uuid.UUID(run_id)
    except ValueError as exc:
        raise NotFoundError(f"no run {run_id!r}") from exc
    if not run_token_matches(state.settings.secret, ident, token):
        from fastapi import HTTPException

        raise HTTPException(401, "not this run's token", headers={"WWW-Authenticate": "Bearer"})
    with state.db.transaction() as session:
        run = get_run(session, ident, lock=True)
        if RunStatus(run.status).terminal and body.kind != "checkpoint":
            return None  # a late report of a cancelled run changes nothing
        apply_report(session, state.settings, run, body)
    return None
