"""A cap on request bodies, enforced while they stream in: a 10 MB body gets 413 before any of it is parsed."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Larger than any run config, policy or report the service takes (a full config is ~3 KB).
MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    """ASGI middleware: refuse a declared Content-Length over the cap at once, and stop reading a body that
    grows past it (chunked uploads) with the same 413, which the problem handlers render."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            scope = {**scope, "orch.body_too_large": too_large}
        received = 0

        async def limited() -> Message:
            nonlocal received
            if scope.get("orch.body_too_large"):
                raise HTTPException(413, too_large)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)
