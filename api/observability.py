"""Observability of the service: Prometheus metrics at /metrics, a request id on every request, JSON logs.

* `Observability` is a pure ASGI middleware (a `BaseHTTPMiddleware` would buffer streamed responses): it
  times each request into `orch_http_request_duration_seconds{method, route, status}`, where `route` is the
  route's template (`/api/v1/runs/{run_id}`), never the raw path, so the label set stays bounded. It takes a
  sane `X-Request-ID` from the caller or makes one, echoes it, and holds it in a context variable that
  `RequestIdFilter` copies into every log record written while the request is served (handler threads
  included). With JSON logs it also writes one access line per request.
* `/metrics` exports the default registry (the reconciler's metrics from orchestrator/metrics.py, process
  and Python metrics) or, with `PROMETHEUS_MULTIPROC_DIR` set, those of all the service's processes. It is
  left out of the latency histogram and, unless refused, the access log: Prometheus already records each
  scrape's duration, and a scrape every few seconds would drown the access log. It needs a read or admin
  token unless the setting `metrics_public` is true, and is not in the OpenAPI document (its role depends on
  that setting).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import fastapi.routing
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, start_http_server
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import current_principal
from orchestrator.settings import Settings

METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = "X-Request-ID"
#: A caller's request id is kept only if it is a short token that is safe in headers, logs and labels.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Other methods share one label value, so a client cannot grow the label set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"

REQUEST_SECONDS = Histogram(
    "orch_http_request_duration_seconds",
    "Time from a request's arrival to the last byte of its response, by route template and status code.",
    ["method", "route", "status"],
)

_request_id: ContextVar[str | None] = ContextVar("orch_request_id", default=None)
access_log = logging.getLogger("api.access")


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside requests, e.g. the reconciler)."""
    return _request_id.get()


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `X-Request-ID` when it is sane, else a new one (uuid4 hex)."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if SANE_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


#: The routes of an app with included routers' prefixes applied: FastAPI versions that keep included routers
#: nested list them through `iter_route_contexts`; older ones flatten `app.routes` themselves.
_effective_routes: Callable[[Sequence[BaseRoute]], Iterable[Any]] = getattr(
    fastapi.routing, "iter_route_contexts", iter
)


def route_templates(routes: Sequence[BaseRoute]) -> dict[int, tuple[BaseRoute, str]]:
    """Each route object's full template (prefixes of included routers applied), by `id`; a route reachable
    under two templates is left out, so it is matched again instead of labelled with the wrong one."""
    table: dict[int, tuple[BaseRoute, str]] = {}
    ambiguous: set[int] = set()
    for context in _effective_routes(routes):
        route = getattr(context, "original_route", context)
        key, template = id(route), str(context.path_format)
        if key in table and table[key][1] != template:
            ambiguous.add(key)
        table[key] = (route, template)
    return {key: entry for key, entry in table.items() if key not in ambiguous}


def route_template(scope: Scope) -> str:
    """The template of the route a request goes to (`/api/v1/runs/{run_id}`, a mount's `/mlflow/{path}`),
    found the way the router finds it (first full match, else the first partial one: a 405), or
    `<unmatched>`. Give it the scope as it arrived: routing rewrites paths inside mounts."""
    partial = None
    for route in _effective_routes(getattr(scope.get("app"), "routes", [])):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(route.path_format)
        if match == Match.PARTIAL and partial is None:
            partial = route
    return UNMATCHED if partial is None else str(partial.path_format)


class Observability:
    """ASGI middleware: request id, latency histogram and (optionally) an access log line per request."""

    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app, self.access_log = app, access_log
        self._templates: dict[int, tuple[BaseRoute, str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers") or [])
        token = _request_id.set(request_id)
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        arrived = dict(scope)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._observe(arrived, self._template(arrived, scope.get("route")), status, time.perf_counter() - started)
            _request_id.reset(token)

    def _template(self, arrived: Scope, matched: BaseRoute | None) -> str:
        """The route's template: looked up from the route the router matched (it leaves it in the scope), else
        found by matching again (mounts, unmatched paths). A matched route in an included router knows only its
        own path, hence the table from each route to its full template, built on the first request."""
        if self._templates is None:
            self._templates = route_templates(getattr(arrived.get("app"), "routes", []))
        known = self._templates.get(id(matched)) if matched is not None else None
        if known is not None and known[0] is matched:
            return known[1]
        return route_template(arrived)  # after the response: the client does not wait for it

    def _observe(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        scrape = route == METRICS_PATH
        if not scrape:
            REQUEST_SECONDS.labels(method, route, str(status)).observe(seconds)
        if self.access_log and not (scrape and status < 400):  # a refused scrape is worth a line
            access_log.info(
                "%s %s %d",
                method,
                route,
                status,
                extra={
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )


# ----------------------------------------------------------------------------------------------- logging


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute: the current request's, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


#: Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
#: uvicorn's `color_message` (the message with terminal colours) is left out too.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, then the
    record's extras and, if any, the formatted exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "info") -> None:
    """Route every logger to one stderr handler writing JsonFormatter lines. uvicorn's loggers propagate
    here when it runs with `log_config=None`; its access log is off, the middleware writes ours."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def setup_logging(log_format: str, level: str) -> dict[str, Any]:
    """Configure the logs of `orchestrator serve` and return uvicorn.run's logging arguments: uvicorn's own
    set-up for text; for JSON our handler, uvicorn's loggers propagating to it and no uvicorn access log
    (the middleware writes one line per request with its request id)."""
    if log_format != "json":
        return {"log_level": level}
    configure_json_logging(level)
    return {"log_level": level, "log_config": None, "access_log": False}


# ----------------------------------------------------------------------------------------------- /metrics


def metrics_registry() -> CollectorRegistry:
    """This process's metrics, or, when `PROMETHEUS_MULTIPROC_DIR` is set, those of every process writing
    there (counters and histograms summed, gauges as their `multiprocess_mode` says)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def serve_metrics(host: str, port: int) -> None:
    """The metrics of a process without the API (a separate `scheduler`) on a port of their own, served
    from a daemon thread."""
    start_http_server(port, addr=host, registry=metrics_registry())


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The metrics in the format the scraper asked for (Prometheus text, or OpenMetrics)."""
    encode, content_type = choose_encoder(accept or "")
    return encode(metrics_registry()), content_type


def metrics_router(public: bool) -> APIRouter:
    """GET /metrics, open when `public`, else behind a read or admin token (401 problem otherwise)."""
    router = APIRouter(include_in_schema=False)
    dependencies = [] if public else [Depends(current_principal)]

    @router.get(METRICS_PATH, dependencies=dependencies)
    def metrics(request: Request) -> Response:
        body, content_type = exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return router


def install_observability(app: FastAPI, settings: Settings) -> None:
    """Add /metrics and the middleware; added last, the middleware is the outermost one, so its time and
    request id cover every other middleware."""
    app.include_router(metrics_router(settings.metrics_public))
    app.add_middleware(Observability, access_log=settings.log_format == "json")
