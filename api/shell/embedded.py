"""The service in this process (API + reconciler on a background thread): the demo and tests use it."""

from __future__ import annotations

import threading
import time
from types import TracebackType

from orchestrator.settings import Settings


class EmbeddedService:
    def __init__(
        self, settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000, reconciler: bool = True
    ) -> None:
        self.host, self.port, self.reconciler = host, port, reconciler
        self.url = f"http://{host}:{port}"
        self.settings = settings or Settings(api_url=self.url)
        if self.settings.api_url != self.url:
            self.settings = self.settings.model_copy(update={"api_url": self.url})
        self._thread: threading.Thread | None = None
        self._server: object = None

    @property
    def token(self) -> str:
        from api.deps import ensure_admin_token
        from orchestrator.settings import parse_tokens

        admins = parse_tokens(self.settings.admin_tokens)
        return next(iter(admins)) if admins else ensure_admin_token(self.settings.home)

    def __enter__(self) -> EmbeddedService:
        import uvicorn

        from api.main import create_app
        from api.shell.client import Client

        app = create_app(self.settings, run_reconciler=self.reconciler)
        server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self._server = server
        self._thread = threading.Thread(target=server.run, name="api", daemon=True)
        self._thread.start()
        deadline = time.time() + 60
        with Client(self.url) as probe:
            while not probe.ready():
                if time.time() > deadline or not self._thread.is_alive():
                    raise RuntimeError(f"the embedded service did not start on {self.url}")
                time.sleep(0.1)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import uvicorn

        if isinstance(self._server, uvicorn.Server):
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
