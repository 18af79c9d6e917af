"""The FastAPI application: REST API under /api/v1, problem+json errors, optional in-process reconciler."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from api import problems
from api.body_limit import BodyLimit
from api.contract import install_contract
from api.deps import AppState
from api.observability import install_observability
from api.routes import evaluations, experiments, health, runs, searches, sweeps
from api.ui import install_ui
from orchestrator.db.migrate import upgrade
from orchestrator.leader import claim_writer, open_lease
from orchestrator.reconciler import Reconciler
from orchestrator.settings import Settings

DESCRIPTION = """
Pretraining runs of DINO and DINO+SelfPatch, recorded in SQL and launched locally, on SLURM or on Ray.

* Authenticate with `Authorization: Bearer <token>`: admin tokens may submit and cancel, read-only
  tokens may look. Only `/healthz` and `/readyz` are open (and `/metrics`, Prometheus text outside this
  document, when the service runs with `ORCH_METRICS_PUBLIC=true`).
* Every response carries `X-Request-ID`: yours if you send a sane one (up to 64 of `A-Za-z0-9._-`), else a
  new one; the service's logs name it.
* Every creating POST accepts an `Idempotency-Key` header: a retried submit never launches twice.
* Errors are RFC 9457 `application/problem+json`; a 422 names the offending field (`errors[].field`).
* Lists use cursors: pass `next_page_token` back as `page_token` until it is null.
* Run lifecycle: queued -> submitted -> running -> (preempted -> requeued -> running)* ->
  succeeded | failed | cancelled. Terminal states never change.
"""


def create_app(settings: Settings | None = None, *, run_reconciler: bool = False) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        claim = claim_writer(settings.db_url)  # SQLite: this process alone (orchestrator/leader.py)
        try:
            upgrade(settings.db_url)  # migrations are applied on start
            state = AppState(settings)
            app.state.orch = state
            stop = threading.Event()
            if run_reconciler:  # several replicas may run one: the lease elects the one that reconciles
                reconciler = Reconciler(settings, state.db, state.launchers, state.mlflow)
                state.lease = open_lease(settings.db_url)
                state.reconciler_thread = threading.Thread(
                    target=reconciler.run_forever, args=(stop, state.lease), name="reconciler", daemon=True
                )
                state.reconciler_thread.start()
            try:
                yield
            finally:
                stop.set()
                if state.reconciler_thread is not None:
                    state.reconciler_thread.join(timeout=30)
                if state.lease is not None:
                    state.lease.release()
                state.launchers.close()
                state.db.dispose()
        finally:
            claim.release()

    app = FastAPI(
        title="SelfPatch Orchestrator",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "runs", "description": "Pretraining runs and their attempts, checkpoints and events."},
            {"name": "experiments", "description": "Named groups of runs and their evaluation policy."},
            {"name": "evaluations", "description": "Benchmarks of checkpoints, triggered by the policy or by hand."},
            {"name": "sweeps", "description": "Ablations: arms x paired seeds, with an honest statistical report."},
            {"name": "health", "description": "Liveness and readiness (no token needed)."},
        ],
    )
    problems.install(app)
    v1 = APIRouter(prefix="/api/v1")
    v1.include_router(runs.router)
    v1.include_router(experiments.router)
    v1.include_router(evaluations.router)
    v1.include_router(sweeps.router)
    v1.include_router(searches.router)
    app.include_router(v1)
    app.include_router(health.router)
    install_ui(app, settings)
    install_contract(app)
    app.add_middleware(BodyLimit)
    install_observability(app, settings)  # /metrics, and the outermost middleware: request id, latency, access log
    return app
