"""Sweeps: create (idempotent, extendable, with a dry run), list, show, their trials, the report and its
plots, cancel, retry failed trials, events."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Admin, IdempotencyKey, PageToken, Reader, SessionDep, StateDep
from api.idempotency import idempotent_post
from api.routes.runs import run_public
from orchestrator.db.models import Sweep, SweepEvent, Trial
from orchestrator.errors import NotFoundError
from orchestrator.jobs.kinds import job_spec
from orchestrator.pages import page, page_after
from orchestrator.schemas import Page, RunPublic
from orchestrator.sweeps.public import SweepCreated, SweepEventPublic, SweepPlan, SweepPublic
from orchestrator.sweeps.search import driver_resources
from orchestrator.sweeps.service import (
    cancel_sweep,
    create_sweep,
    get_sweep,
    plan_sweep,
    report_for,
    report_plots,
    retry_failed,
    sweep_public,
)
from orchestrator.sweeps.spec import SweepSpec

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


def _dump(model: Any) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json")
    return data


@router.post(
    "",
    status_code=201,
    response_model=SweepCreated,
    summary="Create a sweep (the same file again creates nothing; --extend adds arms or seeds)",
    description="Records the sweep, its arms and one queued trial per (arm, seed); the reconciler launches "
    "them within `max_concurrent` and the budget. The same file again returns the sweep (200) and creates "
    "nothing; `extend=true` adds only the missing trials of new arms or seeds; a changed base config, "
    "evaluations or metrics is refused (409) with a diff. `dry_run=true` returns the plan and writes nothing.",
    responses={
        200: {"model": SweepCreated, "description": "The sweep existed: nothing (or only new trials) added"},
        202: {"model": SweepPlan, "description": "dry_run=true: the plan; nothing was written"},
    },
)
def create(
    body: SweepSpec,
    state: StateDep,
    principal: Admin,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    dry_run: Annotated[bool, Query(description="Show the trials, a rendered submission and the cost.")] = False,
    extend: Annotated[bool, Query(description="Add the arms or seeds the file adds to an existing sweep.")] = False,
) -> JSONResponse:
    if dry_run:

        def render(spec: SweepSpec) -> str:
            launcher = spec.launcher_name or state.settings.default_launcher
            kind = "search" if spec.search is not None else "trial"
            root = state.settings.home.resolve() / "searches" if spec.search else state.settings.runs_root
            folder = root / f"<{kind}-id>"
            resources = spec.resources.model_dump(mode="json")
            if spec.search is not None:
                resources = driver_resources(spec)
            return state.launchers.get(launcher).render(
                job_spec(str(uuid.UUID(int=0)), kind, folder, resources, 1, state.settings.python)
            )

        with state.db.sessions() as session:
            return JSONResponse(_dump(plan_sweep(session, state.settings, body, render, extend)), status_code=202)

    def work(session: Session) -> tuple[int, dict[str, Any]]:
        made = create_sweep(session, state.settings, body, f"api:{principal.name}", extend=extend)
        session.flush()
        public = sweep_public(session, made.sweep, state.mlflow)
        return (201 if made.created else 200), _dump(SweepCreated(sweep=public, created=made.created, added=made.added))

    return idempotent_post(state, principal, request, idempotency_key, body, work)


@router.get("", response_model=Page[SweepPublic], summary="List sweeps, newest first")
def list_(
    session: SessionDep,
    state: StateDep,
    _: Reader,
    page_size: Annotated[int, Query(ge=1, le=200)] = 20,
    page_token: PageToken = None,
) -> Page[SweepPublic]:
    query = page_after(select(Sweep), Sweep.created_at, Sweep.id, page_token, uuid.UUID).limit(page_size + 1)
    rows, token = page(list(session.scalars(query)), page_size)
    return Page[SweepPublic](items=[sweep_public(session, s, state.mlflow) for s in rows], next_page_token=token)


@router.get("/{sweep}", response_model=SweepPublic, summary="A sweep: its arm x seed matrix, counts and cost")
def show(sweep: str, session: SessionDep, state: StateDep, _: Reader) -> SweepPublic:
    public: SweepPublic = sweep_public(session, get_sweep(session, sweep), state.mlflow)
    return public


@router.get("/{sweep}/runs", response_model=list[RunPublic], summary="Every trial of a sweep (retries included)")
def runs(sweep: str, session: SessionDep, state: StateDep, _: Reader) -> list[RunPublic]:
    found = get_sweep(session, sweep)
    rows = session.scalars(select(Trial).where(Trial.sweep_id == found.id).order_by(Trial.created_at))
    return [run_public(trial, state.mlflow) for trial in rows]


@router.get(
    "/{sweep}/report",
    summary="The sweep's report: per arm mean and 95% CI, paired differences vs the baseline, Holm-adjusted p",
    responses={200: {"content": {"application/json": {}, "text/markdown": {}, "text/csv": {}}}},
)
def report(
    sweep: str,
    session: SessionDep,
    _: Reader,
    format: Annotated[Literal["json", "markdown", "csv"], Query(description="json, markdown or csv.")] = "json",
) -> Response:
    result = report_for(session, get_sweep(session, sweep))
    if format == "markdown":
        return PlainTextResponse(result.to_markdown(), media_type="text/markdown")
    if format == "csv":
        return PlainTextResponse(result.to_csv(), media_type="text/csv")
    return JSONResponse(result.to_json())


@router.get(
    "/{sweep}/plots/{name}",
    summary="A plot of the report (PNG or SVG): metric, differences, curves (the sweep's `plots` lists them)",
    description="metric: mean and 95% CI per arm, every seed a dot (against the knob for a one-key grid); "
    "differences: paired differences vs the baseline with their CIs; curves: the training loss per arm "
    "(mean and band over seeds, from MLflow), or for a search every trial's objective by epoch.",
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}},
)
def plot(sweep: str, name: str, session: SessionDep, state: StateDep, _: Reader) -> Response:
    found = get_sweep(session, sweep)
    result = report_for(session, found)
    plots = report_plots(session, found, result, state.mlflow)
    stem, _dot, suffix = name.partition(".")
    if stem not in plots or suffix not in ("png", "svg"):
        names = ", ".join(f"{p}.png, {p}.svg" for p in plots)
        raise NotFoundError(f"no plot {name[:50]!r}; plots: {names}")
    fmt: Literal["png", "svg"] = "png" if suffix == "png" else "svg"
    return Response(plots[stem](fmt), media_type="image/png" if fmt == "png" else "image/svg+xml")


@router.post("/{sweep}/cancel", response_model=SweepPublic, summary="Cancel a sweep and stop its trials")
def cancel(sweep: str, state: StateDep, principal: Admin) -> SweepPublic:
    with state.db.transaction() as session:
        found = get_sweep(session, sweep)
        cancel_sweep(session, found, f"api:{principal.name}")
        session.flush()
        public: SweepPublic = sweep_public(session, found, state.mlflow)
        return public


@router.post(
    "/{sweep}/retry",
    response_model=SweepPublic,
    status_code=202,
    summary="Retry the failed (and cancelled) trials: a new trial for each such (arm, seed)",
)
def retry(sweep: str, state: StateDep, principal: Admin) -> SweepPublic:
    with state.db.transaction() as session:
        found = get_sweep(session, sweep)
        retry_failed(session, state.settings, found, f"api:{principal.name}")
        session.flush()
        public: SweepPublic = sweep_public(session, found, state.mlflow)
        return public


@router.get("/{sweep}/events", response_model=list[SweepEventPublic], summary="The sweep's event log")
def events(sweep: str, session: SessionDep, _: Reader) -> list[SweepEventPublic]:
    found = get_sweep(session, sweep)
    rows = session.scalars(select(SweepEvent).where(SweepEvent.sweep_id == found.id).order_by(SweepEvent.id))
    return [SweepEventPublic.model_validate(e, from_attributes=True) for e in rows]
