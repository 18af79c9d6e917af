"""The web UI's pages: runs, a run, sweeps, a sweep, compare, evaluations; server-rendered with Jinja2,
the live parts refreshed by htmx fragments, charts drawn by the Plotly bundle that ships with plotly.

Lists come from SQL, curves from MLflow's metric history (downsampled in `charts.py`). Every page and
fragment needs a login (`Viewer`); every action needs an admin token and the CSRF token (`Actor`).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import AppState, PageToken, SessionDep, StateDep
from api.routes.evaluations import evaluation_public
from api.routes.jobs import cancel_job, job_logs
from api.routes.runs import run_public
from api.ui import session as login
from api.ui.charts import TRAIN_CURVES, CurveCache, curves
from api.ui.deps import Actor, UiUser, Viewer
from evaluator.config import BENCHMARKS
from orchestrator.db.models import Checkpoint, Evaluation, Event, Job, Run, Sweep
from orchestrator.errors import NotFoundError
from orchestrator.lifecycle import Status
from orchestrator.pages import page, page_after
from orchestrator.runs import RunFilters, RunListItem, config_diff, get_run, list_runs, retry_run
from orchestrator.sweeps.service import get_sweep, report_for, report_plots, sweep_public
from trainer.config import flatten

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
CURVE_CACHE = CurveCache()
STATUSES = [s.value for s in Status]
PAGE_SIZE = 50


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


templates.env.filters["fmt"] = _fmt
templates.env.filters["pvalue"] = _p


def render(request: Request, name: str, user: UiUser | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"user": user, "csrf_field": login.CSRF_FIELD, **context}, status_code=status_code
    )


def mlflow_link(experiment_id: str | None, run_id: str | None, tab: str = "") -> str | None:
    if not (experiment_id and run_id):
        return None
    return f"/mlflow/#/experiments/{experiment_id}/runs/{run_id}{'/' + tab if tab else ''}"


def accelerator_hours(run: Run | RunListItem) -> float:
    return sum(a.accelerator_seconds or 0.0 for a in run.attempts) / 3600


def progress_of(run: Run | RunListItem) -> float | None:
    total = run.progress.get("total_iterations")
    done = run.progress.get("iteration")
    if not total or done is None:
        return 1.0 if run.status == Status.SUCCEEDED.value else None
    return max(0.0, min(1.0, float(done) / float(total)))


# ---- login ----


def _safe_next(target: str | None) -> str:
    """Only paths on this site: an open redirect would turn the login form into a phishing aid."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login_submit(
    request: Request,
    state: StateDep,
    token: Annotated[str, Form(max_length=512)],
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    principal = state.principal(token.strip())
    if principal is None:
        return render(request, "login.html", None, status_code=401, next=_safe_next(next), error="unknown token")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        login.COOKIE,
        login.issue(state.settings.secret, token.strip()),
        max_age=login.LIFETIME_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout(_user: Actor) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(login.COOKIE, path="/")
    return response


# ---- runs ----


def _run_rows(state: AppState, runs: list[RunListItem]) -> list[dict[str, Any]]:
    return [
        {
            "run": run,
            "experiment": run.experiment_name,
            "progress": progress_of(run),
            "hours": accelerator_hours(run),
            "terminal": Status(run.status).terminal,
            "mlflow": mlflow_link(run.mlflow_experiment_id, run.mlflow_run_id),
        }
        for run in runs
    ]


class RunForm(RunFilters):
    """The run list's filter form, as the page and its live fragment both read it: an empty field means no
    filter."""

    @model_validator(mode="before")
    @classmethod
    def _empty_is_no_filter(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v != ""} if isinstance(data, dict) else data


Filters = Annotated[RunForm, Query()]


def _runs_context(session: Session, state: AppState, query: RunForm) -> dict[str, Any]:
    runs, token = list_runs(session, query, PAGE_SIZE)
    filters = query.pairs()
    here = filters + ([("page_token", query.page_token)] if query.page_token else [])
    return {
        "rows": _run_rows(state, runs),
        "query": urlencode(here),
        "next_query": urlencode([*filters, ("page_token", token)]) if token else None,
        "filters": dict(filters),
        "chosen_status": {s.value for s in query.status},
        "statuses": STATUSES,
    }


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep, state: StateDep, user: Viewer, query: Filters) -> HTMLResponse:
    return render(request, "runs.html", user, **_runs_context(session, state, query))


@router.get("/fragments/runs", response_class=HTMLResponse)
def runs_fragment(request: Request, session: SessionDep, state: StateDep, user: Viewer, query: Filters) -> HTMLResponse:
    return render(request, "_runs_table.html", user, **_runs_context(session, state, query))


@router.post("/runs/{run_id}/cancel")
def cancel_run(run_id: str, state: StateDep, user: Actor) -> Response:
    cancel_job(state, Run, run_id, "run", f"ui:{user.principal.name}", lambda run: run.id)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@router.post("/runs/{run_id}/retry")
def retry(run_id: str, state: StateDep, user: Actor) -> Response:
    with state.db.transaction() as session:
        new = retry_run(session, state.settings, get_run(session, run_id, lock=True), f"ui:{user.principal.name}")
        target = f"/runs/{new.id}"
    return RedirectResponse(target, status_code=303)


HEADLINE = ("top1_k20", "top1", "mIoU", "bbox_AP", "segm_AP", "fg_mIoU", "top1_k10", "mAcc")


def headline(metrics: dict[str, float], count: int = 4) -> list[tuple[str, float]]:
    """The few numbers a cell shows: the benchmarks' headline metrics first, sizes and timings last."""

    def rank(key: str) -> tuple[int, str]:
        name = key.rsplit("/", 1)[-1]
        return (HEADLINE.index(name) if name in HEADLINE else len(HEADLINE), key)

    return [(k, metrics[k]) for k in sorted(metrics, key=rank)[:count]]


def _evaluation_matrix(session: Session, run: Run) -> tuple[list[str], list[dict[str, Any]]]:
    """Checkpoints as rows, benchmarks as columns; a cell is the newest evaluation of that pair."""
    checkpoints = list(session.scalars(select(Checkpoint).where(Checkpoint.run_id == run.id).order_by(Checkpoint.step)))
    evaluations = list(
        session.scalars(select(Evaluation).where(Evaluation.run_id == run.id).order_by(Evaluation.created_at))
    )
    benchmarks = list(dict.fromkeys(e.benchmark for e in evaluations))
    cells: dict[tuple[uuid.UUID, str], Evaluation] = {}
    for evaluation in evaluations:
        cells[(evaluation.checkpoint_id, evaluation.benchmark)] = evaluation
    rows = []
    for ckpt in checkpoints:
        row: dict[str, Any] = {"checkpoint": ckpt, "cells": {}}
        for bench in benchmarks:
            found = cells.get((ckpt.id, bench))
            if found is not None:
                row["cells"][bench] = {"status": found.status, "metrics": headline(found.metrics), "id": found.id}
        rows.append(row)
    return benchmarks, rows


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, session: SessionDep, state: StateDep, user: Viewer) -> HTMLResponse:
    run = get_run(session, run_id)
    public = run_public(run, state.mlflow)
    events = list(session.scalars(select(Event).where(Event.job_id == run.id).order_by(Event.id).limit(500)))
    benchmarks, matrix = _evaluation_matrix(session, run)
    try:
        log_tail = job_logs(state, run, 80, None) if run.attempts else ""
    except Exception as exc:  # the scheduler may have forgotten the job; the page still shows the rest
        log_tail = f"(log unavailable: {type(exc).__name__})"
    return render(
        request,
        "run.html",
        user,
        run=run,
        public=public,
        diff=config_diff(session, run),
        events=events,
        attempts=run.attempts,
        benchmarks=benchmarks,
        matrix=matrix,
        log_tail=log_tail,
        progress=progress_of(run),
        hours=accelerator_hours(run),
        terminal=Status(run.status).terminal,
        mlflow=mlflow_link(run.mlflow_experiment_id, run.mlflow_run_id),
        mlflow_artifacts=mlflow_link(run.mlflow_experiment_id, run.mlflow_run_id, "artifacts"),
        curve_keys=TRAIN_CURVES,
    )


@router.get("/fragments/runs/{run_id}/status", response_class=HTMLResponse)
def run_status_fragment(run_id: str, request: Request, session: SessionDep, user: Viewer) -> HTMLResponse:
    run = get_run(session, run_id)
    return render(request, "_run_status.html", user, run=run, progress=progress_of(run))


@router.get("/runs/{run_id}/curves.json")
def run_curves(
    run_id: str,
    session: SessionDep,
    state: StateDep,
    _user: Viewer,
    key: Annotated[list[str] | None, Query(max_length=20)] = None,
    max_points: Annotated[int, Query(ge=10, le=10_000)] = 1000,
) -> JSONResponse:
    run = get_run(session, run_id)
    keys = [k for k in (key or TRAIN_CURVES) if len(k) <= 250]
    if not run.mlflow_run_id:
        return JSONResponse({"run": str(run.id), "curves": {}})
    found = curves(
        state.mlflow,
        CURVE_CACHE,
        run.mlflow_run_id,
        keys,
        finished=Status(run.status).terminal,
        max_points=max_points,
    )
    return JSONResponse({"run": str(run.id), "name": run.name, "curves": found})


# ---- sweeps ----


@router.get("/sweeps", response_class=HTMLResponse)
def sweeps_page(
    request: Request, session: SessionDep, state: StateDep, user: Viewer, page_token: PageToken = None
) -> HTMLResponse:
    query = page_after(select(Sweep), Sweep.created_at, Sweep.id, page_token, uuid.UUID).limit(PAGE_SIZE + 1)
    rows, token = page(list(session.scalars(query)), PAGE_SIZE)
    sweeps = [sweep_public(session, s, None) for s in rows]
    return render(request, "sweeps.html", user, sweeps=sweeps, next_token=token)


@router.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(sweep_id: str, request: Request, session: SessionDep, state: StateDep, user: Viewer) -> HTMLResponse:
    found = get_sweep(session, sweep_id)
    public = sweep_public(session, found, None)
    report = report_for(session, found)
    cells = {(t.arm, t.seed): t for t in public.trials}
    parcoords = _parcoords(session, found, public) if public.search is not None else None
    return render(
        request,
        "sweep.html",
        user,
        sweep=public,
        report=report,
        cells=cells,
        parcoords=parcoords,
        mlflow=mlflow_link(found.mlflow_experiment_id, found.mlflow_run_id),
    )


def _parcoords(session: Session, sweep: Sweep, public: Any) -> dict[str, Any]:
    runs = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_([t.run_id for t in public.trials])))}
    space = list((public.spec.get("search") or {}).get("space", {}))
    trials = [(runs[t.run_id].config if t.run_id in runs else {}, t.primary) for t in public.trials]
    return parcoords(space, trials, public.primary_metric)


def parcoords(space: list[str], trials: list[tuple[dict[str, Any], float | None]], objective: str) -> dict[str, Any]:
    """Ray Tune searches: one line per trial through its sampled settings and its objective (None: no value)."""
    dims: list[dict[str, Any]] = []
    for key in space:
        values = [flatten(config).get(key) for config, _ in trials]
        dims.append({"label": key, "values": [float(v) if isinstance(v, int | float) else None for v in values]})
    dims.append({"label": objective, "values": [value for _, value in trials]})
    return {"dimensions": dims}


@router.get("/sweeps/{sweep_id}/plots/{name}")
def sweep_plot(sweep_id: str, name: str, session: SessionDep, state: StateDep, _user: Viewer) -> Response:
    found = get_sweep(session, sweep_id)
    plots = report_plots(session, found, report_for(session, found), state.mlflow)
    stem, _dot, suffix = name.partition(".")
    if stem not in plots or suffix != "svg":
        raise NotFoundError(f"no plot {name[:50]!r}")
    return Response(plots[stem]("svg"), media_type="image/svg+xml")


@router.get("/fragments/sweeps/{sweep_id}/matrix", response_class=HTMLResponse)
def sweep_matrix_fragment(sweep_id: str, request: Request, session: SessionDep, user: Viewer) -> HTMLResponse:
    public = sweep_public(session, get_sweep(session, sweep_id), None)
    return render(request, "_sweep_matrix.html", user, sweep=public, cells={(t.arm, t.seed): t for t in public.trials})


# ---- compare ----


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    user: Viewer,
    run: Annotated[list[uuid.UUID] | None, Query(max_length=12)] = None,
) -> HTMLResponse:
    chosen = [get_run(session, r) for r in dict.fromkeys(run or [])]
    flat = [flatten(r.config) for r in chosen]
    keys = sorted({k for f in flat for k in f})
    differing = [(k, [f.get(k) for f in flat]) for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    finals: list[dict[str, float]] = []
    for r in chosen:
        metrics: dict[str, float] = {}
        for evaluation in session.scalars(
            select(Evaluation).where(Evaluation.run_id == r.id).order_by(Evaluation.created_at)
        ):
            if evaluation.status == Status.SUCCEEDED.value:
                metrics.update(evaluation.metrics)  # named `<benchmark>/<metric>` already
        finals.append(metrics)
    metric_keys = sorted({k for m in finals for k in m})
    return render(
        request,
        "compare.html",
        user,
        runs=chosen,
        differing=differing,
        finals=finals,
        metric_keys=metric_keys,
        curve_keys=TRAIN_CURVES,
    )


# ---- evaluations ----


@router.get("/evaluations", response_class=HTMLResponse)
def evaluations_page(
    request: Request,
    session: SessionDep,
    user: Viewer,
    page_token: PageToken = None,
    benchmark: Annotated[str | None, Query(pattern=r"^[a-z_]{0,32}$")] = None,
) -> HTMLResponse:
    query = select(Evaluation)
    if benchmark:
        query = query.where(Evaluation.benchmark == benchmark)
    query = page_after(query, Job.created_at, Job.id, page_token, uuid.UUID).limit(PAGE_SIZE + 1)
    rows, token = page(list(session.scalars(query)), PAGE_SIZE)
    runs = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_([e.run_id for e in rows])))}
    items = [
        {"evaluation": evaluation_public(e), "run": runs.get(e.run_id), "paper": _paper(e, runs.get(e.run_id))}
        for e in rows
    ]
    next_query = urlencode([("benchmark", benchmark or ""), ("page_token", token)]) if token else None
    return render(
        request,
        "evaluations.html",
        user,
        items=items,
        next_query=next_query,
        benchmark=benchmark or "",
        benchmarks=list(BENCHMARKS),
    )


def _paper(evaluation: Evaluation, run: Run | None) -> dict[str, str]:
    """The paper's number for each metric this benchmark shares with it, for the run's method."""
    spec = BENCHMARKS.get(evaluation.benchmark)
    if spec is None or run is None:
        return {}
    named = {f"{evaluation.benchmark}/{metric}": by_method for metric, by_method in spec.paper.items()}
    return {
        metric: f"{by_method[run.method]:.1f}"
        for metric, by_method in named.items()
        if run.method in by_method and metric in evaluation.metrics
    }
