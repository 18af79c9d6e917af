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
    reconciler = state.reconciler_alive()
    if reconciler is False:
        return JSONResponse({"status": "unavailable", "detail": "reconciler thread died"}, status_code=503)
    return JSONResponse({"status": "ready", "schema": version, "reconciler": reconciler})
