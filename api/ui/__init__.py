"""The web UI: our pages at `/`, static files (htmx vendored, Plotly from its package), MLflow's UI at /mlflow."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from api.ui.deps import ForbiddenError, LoginRequiredError, who_is
from api.ui.mlflow_mount import PREFIX, mlflow_app
from api.ui.pages import render, router
from orchestrator.settings import Settings


def install_ui(app: FastAPI, settings: Settings) -> None:
    app.include_router(router)
    app.mount("/static/plotly", StaticFiles(packages=[("plotly", "package_data")]), name="plotly")
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.mount(PREFIX, mlflow_app(settings.tracking_uri, lambda cookie: who_is(app.state.orch, cookie)), name="mlflow")

    @app.exception_handler(LoginRequiredError)
    async def to_login(request: Request, exc: LoginRequiredError) -> Response:
        target = f"/login?next={quote(exc.next_path, safe='/')}"
        if request.headers.get("HX-Request"):  # a fragment: htmx follows HX-Redirect with a full page load
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(ForbiddenError)
    async def forbidden(request: Request, exc: ForbiddenError) -> HTMLResponse:
        return render(request, "forbidden.html", None, status_code=403, reason=str(exc))
