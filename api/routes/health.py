"""Liveness and readiness: the only endpoints that need no token."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers and the schema is migrated")
def readyz(state: StateDep) -> JSONResponse:
    try:
        with state.db.engine.connect() as connection:
            version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "detail": str(exc)[:200]}, status_code=503)
    if state.reconciler_alive() is False:
        return JSONResponse({"status": "unavailable", "detail": "reconciler thread died"}, status_code=503)
    # "leader" reconciles, "standby" waits for the leader's lock (another replica leads), null: none here
    return JSONResponse({"status": "ready", "schema": version, "reconciler": state.reconciler_role()})
