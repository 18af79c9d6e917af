"""The contract of every route, in one table: who may call it and which answers it can give.

`ROUTES` names each operation's role: `open` (no token), `read` (a read or admin token), `admin` (an admin
token) or `job` (the job's own token, derived from its id). The OpenAPI document is completed from it:
the bearer scheme, and every 4xx the route can return as `application/problem+json` (401 without or with
an unknown token, 403 for a read token on an admin route, 404 for an unknown id, 409 for a refused state
change, 413 for a body over the limit, 422 for invalid input, 400 for malformed JSON). The app refuses to
start with a route missing from the table, and tests walk the document checking each role's answers.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

Role = Literal["open", "read", "admin", "job"]

#: "METHOD /path" -> who may call it.
ROUTES: dict[str, Role] = {
    "GET /healthz": "open",
    "GET /readyz": "open",
    "POST /api/v1/runs": "admin",
    "GET /api/v1/runs": "read",
    "GET /api/v1/runs/{run_id}": "read",
    "POST /api/v1/runs/{run_id}/cancel": "admin",
    "POST /api/v1/runs/{run_id}/retry": "admin",
    "GET /api/v1/runs/{run_id}/attempts": "read",
    "GET /api/v1/runs/{run_id}/checkpoints": "read",
    "GET /api/v1/runs/{run_id}/events": "read",
    "GET /api/v1/runs/{run_id}/logs": "read",
    "GET /api/v1/runs/{run_id}/evaluations": "read",
    "POST /api/v1/runs/{run_id}/reports": "job",
    "POST /api/v1/experiments": "admin",
    "GET /api/v1/experiments": "read",
    "GET /api/v1/experiments/{experiment}": "read",
    "PATCH /api/v1/experiments/{experiment}": "admin",
    "GET /api/v1/evaluations": "read",
    "GET /api/v1/evaluations/compare": "read",
    "GET /api/v1/evaluations/{evaluation_id}": "read",
    "POST /api/v1/evaluations/{evaluation_id}/cancel": "admin",
    "POST /api/v1/evaluations/{evaluation_id}/retry": "admin",
    "GET /api/v1/evaluations/{evaluation_id}/attempts": "read",
    "GET /api/v1/evaluations/{evaluation_id}/events": "read",
    "GET /api/v1/evaluations/{evaluation_id}/logs": "read",
    "POST /api/v1/evaluations/{evaluation_id}/reports": "job",
    "GET /api/v1/checkpoints/{checkpoint_id}/evaluations": "read",
    "POST /api/v1/checkpoints/{checkpoint_id}/evaluations": "admin",
    "GET /api/v1/benchmarks": "read",
    "POST /api/v1/sweeps": "admin",
    "GET /api/v1/sweeps": "read",
    "GET /api/v1/sweeps/{sweep}": "read",
    "GET /api/v1/sweeps/{sweep}/runs": "read",
    "GET /api/v1/sweeps/{sweep}/report": "read",
    "GET /api/v1/sweeps/{sweep}/plots/{name}": "read",
    "POST /api/v1/sweeps/{sweep}/cancel": "admin",
    "POST /api/v1/sweeps/{sweep}/retry": "admin",
    "GET /api/v1/sweeps/{sweep}/events": "read",
    "GET /api/v1/searches/{search_id}": "read",
    "POST /api/v1/searches/{search_id}/trials": "job",
    "POST /api/v1/searches/{search_id}/cancel": "admin",
    "GET /api/v1/searches/{search_id}/attempts": "read",
    "GET /api/v1/searches/{search_id}/events": "read",
    "GET /api/v1/searches/{search_id}/logs": "read",
    "POST /api/v1/searches/{search_id}/reports": "job",
}

#: Answers beyond the ones a route's shape implies: state changes that can be refused (409).
CONFLICTS = {
    "POST /api/v1/runs/{run_id}/cancel",
    "POST /api/v1/runs/{run_id}/retry",
    "POST /api/v1/evaluations/{evaluation_id}/cancel",
    "POST /api/v1/evaluations/{evaluation_id}/retry",
    "POST /api/v1/experiments",
    "POST /api/v1/runs/{run_id}/reports",
    "POST /api/v1/evaluations/{evaluation_id}/reports",
    "POST /api/v1/sweeps",
    "POST /api/v1/sweeps/{sweep}/cancel",
    "POST /api/v1/sweeps/{sweep}/retry",
    "POST /api/v1/searches/{search_id}/trials",
    "POST /api/v1/searches/{search_id}/cancel",
    "POST /api/v1/searches/{search_id}/reports",
}
#: Routes whose query names resources by id (an unknown one is a 404, as in a path).
LOOKUPS = {"GET /api/v1/evaluations/compare"}
#: Routes whose answer can also depend on the state of the service (readiness).
UNAVAILABLE = {"GET /readyz"}

WHY = {
    400: "The body is not valid JSON.",
    401: "No token, or a token this service does not know (for job routes: not this job's token).",
    403: "The token is read-only; this route needs an admin token.",
    404: "No such resource.",
    409: "The current state refuses this change (terminal states never change).",
    413: "The request body is larger than the service accepts.",
    422: "Invalid input; `errors[].field` names the field.",
    503: "The database does not answer (retry; with the same Idempotency-Key for a POST), or, for /readyz, "
    "the schema is not migrated or the reconciler died.",
}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "code": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": ["string", "null"]},
                    "message": {"type": "string"},
                    "type": {"type": ["string", "null"]},
                },
            },
        },
    },
}


def problem_response(status: int) -> dict[str, Any]:
    return {
        "description": WHY[status],
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def answers(key: str, operation: dict[str, Any]) -> list[int]:
    """The 4xx/5xx answers of one operation, from its role and its shape."""
    role = ROUTES[key]
    codes = []
    if role != "open":
        codes.append(401)
    if role == "admin":
        codes.append(403)
    if re.search(r"\{\w+\}", key) or key in LOOKUPS:
        codes.append(404)
    if key in CONFLICTS:
        codes.append(409)
    if "requestBody" in operation:
        codes += [400, 413]
    if "requestBody" in operation or operation.get("parameters"):
        codes.append(422)
    if role != "open" or key in UNAVAILABLE:
        codes.append(503)
    return sorted(set(codes))


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)) + "$")


TEMPLATES: list[tuple[re.Pattern[str], str]] = [
    (_template(key.split(" ", 1)[1]), key.split(" ", 1)[0]) for key in ROUTES
]


def allowed_methods(path: str) -> list[str]:
    """The methods the service answers on a concrete path (the `Allow` header of a 405)."""
    return sorted({method for pattern, method in TEMPLATES if pattern.match(path)})


BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def standard_bounds(node: Any) -> None:
    """Numeric bounds that pydantic leaves as `ge`/`le` (on types with their own before-validator, such as
    `Integer`) become the JSON Schema keywords every client reads."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for short, keyword in BOUNDS.items():
                if short in node:
                    node[keyword] = node.pop(short)
        for value in node.values():
            standard_bounds(value)
    elif isinstance(node, list):
        for value in node:
            standard_bounds(value)


def install_contract(app: FastAPI) -> None:
    """Check every route is in the table and make the OpenAPI document say what the service answers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        operations = {f"{m.upper()} {path}": op for path, ops in spec["paths"].items() for m, op in ops.items()}
        missing = sorted(set(operations) - set(ROUTES))
        stale = sorted(set(ROUTES) - set(operations))
        if missing or stale:
            raise RuntimeError(f"api.contract.ROUTES is out of date: undeclared {missing}, gone {stale}")
        standard_bounds(spec)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for key, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for code in answers(key, operation):
                responses[str(code)] = problem_response(code)
            if ROUTES[key] == "open":
                operation.pop("security", None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    openapi()  # fail at start-up, not at the first request for the document
