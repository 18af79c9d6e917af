"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.contract import allowed_methods
from orchestrator.errors import ServiceError
from orchestrator.lifecycle import TransitionError

PROBLEM_BASE = "https://selfpatch-orchestrator.dev/problems/"
MEDIA_TYPE = "application/problem+json"


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "code": code,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for error in exc.errors():
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            field = "body" if error.get("type") == "json_invalid" else _field(tuple(error.get("loc", ())))
            errors.append({"field": field, "message": message, "type": error.get("type")})
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        path = request.url.path
        if any(e["type"] == "json_invalid" for e in errors):
            detail = f"the request body is not valid JSON: {first['message']}"
            return problem(400, "malformed_json", "Malformed JSON", detail, path, errors)
        return problem(422, "invalid_input", "Invalid input", f"{first['field']}: {first['message']}", path, errors)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        errors = [{"field": exc.field, "message": exc.detail}] if exc.field else None
        title = {404: "Not found", 409: "Conflict", 422: "Invalid input"}.get(exc.status, "Bad request")
        return problem(exc.status, exc.code, title, exc.detail, request.url.path, errors)

    @app.exception_handler(TransitionError)
    async def _transition(request: Request, exc: TransitionError) -> JSONResponse:
        return problem(409, "invalid_transition", "Invalid state transition", str(exc), request.url.path)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if not (exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)):
            return await _unexpected(request, exc)
        logging.getLogger("api").warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        detail = "the database does not answer right now; nothing was committed, retry (same Idempotency-Key)"
        return problem(
            503, "database_unavailable", "Database unavailable", detail, request.url.path, headers={"Retry-After": "2"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("api").exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(
            500,
            "internal_error",
            "Internal error",
            f"{type(exc).__name__}: the service failed; nothing was committed",
            request.url.path,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
        }.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # every method of the path, not just those of the route that matched first
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.url.path))}
        return problem(exc.status_code, code, str(exc.detail), str(exc.detail), request.url.path, headers=headers)
