"""Runs: submit (with Idempotency-Key and dry run), list, show, cancel, retry, attempts, checkpoints,
events, log tail, and the job-report endpoint that jobs call with their run token."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from sqlalchemy import select

from api.deps import Admin, IdempotencyKey, Reader, SessionDep, StateDep
from api.idempotency import idempotent_post
from api.routes.jobs import add_job_routes
from orchestrator.db.models import Checkpoint, Run
from orchestrator.errors import InvalidInputError
from orchestrator.jobs.kinds import job_spec
from orchestrator.launchers.base import LauncherError
from orchestrator.mlflow_bridge import MlflowBridge
from orchestrator.runs import (
    RunFilters,
    RunListItem,
    SubmittedRun,
    collapse_reason,
    get_run,
    list_runs,
    resolve_config,
    retry_run,
    submit_run,
)
from orchestrator.schemas import (
    CheckpointPublic,
    DryRun,
    Page,
    RunCreate,
    RunPublic,
    RunSummary,
)

router = APIRouter(prefix="/runs", tags=["runs"])


class RunListQuery(RunFilters):
    """GET /runs query parameters: the list's filters and cursor, and the page size."""

    page_size: int = Field(50, ge=1, le=500, description="Runs per page.")


def run_public(run: Run | SubmittedRun, mlflow: MlflowBridge) -> RunPublic:
    return RunPublic.model_validate({"config": run.config, **_summary_fields(run, mlflow)}, from_attributes=True)


def _summary_fields(run: Run | RunListItem, mlflow: MlflowBridge) -> dict[str, Any]:
    """Never touches `run.config`: list items do not have it. Attempts are validated from their attributes."""
    return dict(
        id=run.id,
        experiment=run.experiment_name,
        name=run.name,
        method=run.method,
        status=run.status,
        status_reason=run.status_reason,
        launcher=run.launcher,
        resources=run.resources,
        config_hash=run.config_hash,
        requeues=run.requeues,
        retry_of=run.retry_of_id,
        output_dir=run.output_dir,
        progress=run.progress,
        collapsed=collapse_reason(run.progress),
        mlflow_run_id=run.mlflow_run_id,
        mlflow_url=mlflow.run_url(run.mlflow_experiment_id, run.mlflow_run_id),
        created_by=run.created_by,
        created_at=run.created_at,
        updated_at=run.updated_at,
        started_at=run.started_at,
        ended_at=run.ended_at,
        attempts=run.attempts,
    )


def _dump(model: Any) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json")
    return data


@router.post(
    "",
    status_code=202,
    response_model=RunPublic,
    summary="Submit a pretraining run",
    description="Validates the config with the trainer's own classes, records the run as `queued` and returns "
    "202; the reconciler launches it. `dry_run=true` renders the submission (sbatch script, Ray spec or "
    "command line) and writes nothing.",
    responses={
        202: {"description": "Accepted: the run, status queued"},
        200: {"model": DryRun, "description": "dry_run=true: what would be submitted; nothing was written"},
    },
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
        resources = body.resources.model_dump(mode="json")
        spec = job_spec(
            str(uuid.UUID(int=0)), "train", state.settings.runs_root / "<run-id>", resources, 1, state.settings.python
        )
        try:
            rendered = state.launchers.get(launcher_name).render(spec)
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
        return 202, _dump(run_public(run, state.mlflow))

    return idempotent_post(state, principal, request, idempotency_key, body, work)


@router.get(
    "",
    response_model=Page[RunSummary],
    summary="List runs, newest first (cursor pagination)",
    description="Items carry everything but the config (GET /runs/{id} has it).",
)
def list_(session: SessionDep, state: StateDep, _: Reader, query: Annotated[RunListQuery, Query()]) -> Response:
    # serialized from the typed columns it was read from, without building RunSummary models (a third of a
    # page's CPU), by orjson (3x faster than pydantic-core's type inference on these dicts; UTC as "Z" as pydantic
    # writes it); a test checks the bytes equal the validated Page[RunSummary]'s
    runs, token = list_runs(session, query, query.page_size)
    items = [_summary_fields(r, state.mlflow) | {"attempts": [a._asdict() for a in r.attempts]} for r in runs]
    page = orjson.dumps({"items": items, "next_page_token": token}, option=orjson.OPT_UTC_Z)
    return Response(page, media_type="application/json")


@router.get("/{run_id}", response_model=RunPublic, summary="Show one run with its attempts")
def show(run_id: str, session: SessionDep, state: StateDep, _: Reader) -> RunPublic:
    return run_public(get_run(session, run_id), state.mlflow)


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
        return 202, _dump(run_public(new, state.mlflow))

    return idempotent_post(state, principal, request, idempotency_key, {"retry": run_id}, work)


@router.get("/{run_id}/checkpoints", response_model=list[CheckpointPublic], summary="Checkpoints a run recorded")
def checkpoints(run_id: str, session: SessionDep, _: Reader) -> list[CheckpointPublic]:
    run = get_run(session, run_id)
    rows = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run.id).order_by(Checkpoint.step))
    return [CheckpointPublic.model_validate(c, from_attributes=True) for c in rows]


add_job_routes(router, Run, "run", lambda run, state: run_public(run, state.mlflow), RunPublic)
