"""MLflow's own UI at /mlflow on the service's port, behind the same login as our pages.

With an MLflow server (`ORCH_MLFLOW_TRACKING_URI=http://...`, the production stack) requests are proxied to
it; with a local store (the embedded default) MLflow's Flask app is mounted in-process over that store. Its
UI uses relative URLs and a hash router, so `/mlflow/#/experiments/E/runs/R` works under the prefix.
Read tokens may look (GET, searches and gets); only admin tokens reach MLflow's writing endpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import Principal
from api.ui.session import COOKIE

PREFIX = "/mlflow"
WhoIs = Callable[[str | None], Principal | None]
# never forwarded either way: our credentials stay here, hop-by-hop headers are per connection
# (MLflow checks Host and Origin against DNS rebinding and cross-site writes; our guard and the SameSite
# cookie do that here, and to MLflow every request comes from this server)
_DROP_REQUEST = {
    b"host",
    b"cookie",
    b"authorization",
    b"connection",
    b"content-length",
    b"accept-encoding",
    b"origin",
    b"referer",
}
_DROP_RESPONSE = {"connection", "transfer-encoding", "content-encoding", "content-length", "set-cookie"}


def read_only(method: str, path: str) -> bool:
    """What a read token may do in MLflow's UI: load pages and call the endpoints that only look."""
    if method in ("GET", "HEAD"):
        return True
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return method == "POST" and ("search" in last or last.startswith("get"))


def _cookie(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            jar.load(value.decode("latin-1"))
            if COOKIE in jar:
                return jar[COOKIE].value
    return None


async def _plain(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


class Guarded:
    """Only a logged-in browser gets through; the login page brings it back here afterwards."""

    def __init__(self, inner: ASGIApp, who: WhoIs) -> None:
        self.inner = inner
        self.who = who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        principal = self.who(_cookie(scope))
        if principal is None:
            if scope["method"] == "GET" and "ajax-api" not in scope["path"]:
                location = f"/login?next={PREFIX}/".encode()
                await _plain(send, 303, "log in first", [(b"location", location)])
            else:
                await _plain(send, 401, "log in first")
            return
        if principal.role != "admin" and not read_only(scope["method"], scope["path"]):
            await _plain(send, 403, f"token {principal.name!r} is read-only")
            return
        await self.inner(scope, receive, send)


class Proxy:
    """A streaming reverse proxy to an MLflow server: method, path under the prefix, query and body."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        path = path[len(PREFIX) :] if path.startswith(PREFIX) else path
        url = self.upstream + (path or "/")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _DROP_REQUEST]
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _plain(send, 502, f"MLflow at {self.upstream} did not answer: {type(exc).__name__}")
            return
        try:
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
            out = [(k, v) for k, v in out if k.decode().lower() not in _DROP_RESPONSE]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def in_process(tracking_uri: str) -> ASGIApp:
    """MLflow's Flask app over a local store (its server reads the store from these variables), imported on
    the first request to /mlflow, not when the service starts. The app is a module-level singleton that
    caches its store, so a process serves one local store: the first it mounts."""
    loaded: list[Any] = []

    def wsgi() -> Any:
        if not loaded:
            from a2wsgi import WSGIMiddleware

            os.environ.setdefault("_MLFLOW_SERVER_FILE_STORE", tracking_uri)
            if tracking_uri.startswith("sqlite:///"):
                artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
                os.environ.setdefault("_MLFLOW_SERVER_ARTIFACT_ROOT", artifacts.as_uri())
            from mlflow.server import app as flask_app

            loaded.append(WSGIMiddleware(flask_app))  # type: ignore[arg-type]
        return loaded[0]

    async def local(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k not in _DROP_REQUEST]
            scope = {**scope, "headers": [(b"host", b"localhost"), *headers]}
        await wsgi()(scope, receive, send)

    return local


def mlflow_app(tracking_uri: str, who: WhoIs) -> ASGIApp:
    inner = Proxy(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else in_process(tracking_uri)
    return Guarded(inner, who)
