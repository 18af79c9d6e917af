"""A small typed client of the REST API (used by the CLI, the demo and the tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from orchestrator.settings import default_home

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(RuntimeError):
    """A problem+json reply, reduced to one line."""

    def __init__(self, status: int, body: dict[str, Any] | str, hint: str = "") -> None:
        self.status, self.body = status, body
        if isinstance(body, dict):
            detail = body.get("detail") or body.get("title") or "error"
            fields = [e.get("field") for e in body.get("errors", []) if e.get("field")]
            field = f" [field: {fields[0]}]" if fields and fields[0] not in str(detail) else ""
            message = f"HTTP {status}: {detail}{field}"
        else:
            message = body[:300] if status == 0 else f"HTTP {status}: {body[:200]}"
        super().__init__(f"{message} ({hint})" if hint else message)


def find_token(explicit: str | None = None) -> tuple[str | None, str]:
    """The token to send and where it came from: --token or $ORCH_TOKEN, then $ORCH_HOME/admin.token, then
    the default home's admin.token (which `orchestrator serve` writes when no tokens are configured)."""
    if explicit:
        return explicit, "--token / $ORCH_TOKEN"
    tried = ["$ORCH_TOKEN (unset)"]
    homes = [Path(os.environ["ORCH_HOME"])] if os.environ.get("ORCH_HOME") else []
    for home in [*homes, default_home()]:
        path = home / "admin.token"
        if path.is_file():
            return path.read_text().strip(), str(path)
        tried.append(f"{path} (missing)")
    return None, "no token found; tried " + ", ".join(tried)


class Client:
    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 30.0, token_source: str = ""
    ) -> None:
        self.token_source = token_source  # said in a 401, so a user sees which token was refused or missing
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(
                0,
                f"cannot reach the service at {self.http.base_url} ({exc}); start it with `orchestrator serve` "
                "or point --url / $ORCH_URL at it",
            ) from exc
        if response.status_code >= 400:
            try:
                body: dict[str, Any] | str = response.json()
            except ValueError:
                body = response.text
            hint = f"token: {self.token_source}" if response.status_code == 401 and self.token_source else ""
            raise ApiError(response.status_code, body, hint)
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith(("application/json", "application/problem+json")):
            return response.json()
        return response.text

    # ---- runs
    def submit(self, body: dict[str, Any], *, dry_run: bool = False, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/api/v1/runs", json=body, params={"dry_run": dry_run}, headers=headers)

    def runs(self, **params: Any) -> Any:
        return self.request("GET", "/api/v1/runs", params={k: v for k, v in params.items() if v is not None})

    def run(self, run_id: str) -> Any:
        return self.request("GET", f"/api/v1/runs/{run_id}")

    def cancel(self, run_id: str) -> Any:
        return self.request("POST", f"/api/v1/runs/{run_id}/cancel")

    def retry(self, run_id: str) -> Any:
        return self.request("POST", f"/api/v1/runs/{run_id}/retry")

    def checkpoints(self, run_id: str) -> Any:
        return self.request("GET", f"/api/v1/runs/{run_id}/checkpoints")

    def events(self, run_id: str, page_token: str | None = None) -> Any:
        params = {"page_token": page_token} if page_token else {}
        return self.request("GET", f"/api/v1/runs/{run_id}/events", params=params)

    def logs(self, run_id: str, tail: int = 200) -> str:
        text: str = self.request("GET", f"/api/v1/runs/{run_id}/logs", params={"tail": tail}) or ""
        return text

    # ---- evaluations
    def evaluations(self, **params: Any) -> Any:
        return self.request("GET", "/api/v1/evaluations", params={k: v for k, v in params.items() if v is not None})

    def evaluation(self, evaluation_id: str) -> Any:
        return self.request("GET", f"/api/v1/evaluations/{evaluation_id}")

    def compare(self, checkpoint_ids: list[str]) -> Any:
        return self.request("GET", "/api/v1/evaluations/compare", params={"checkpoint": checkpoint_ids})

    def run_evaluations(self, run_id: str) -> Any:
        return self.request("GET", f"/api/v1/runs/{run_id}/evaluations")

    def retry_evaluation(self, evaluation_id: str) -> Any:
        return self.request("POST", f"/api/v1/evaluations/{evaluation_id}/retry")

    def cancel_evaluation(self, evaluation_id: str) -> Any:
        return self.request("POST", f"/api/v1/evaluations/{evaluation_id}/cancel")

    def evaluate(self, checkpoint_id: str, body: dict[str, Any]) -> Any:
        return self.request("POST", f"/api/v1/checkpoints/{checkpoint_id}/evaluations", json=body)

    def experiment(self, name: str, body: dict[str, Any] | None = None) -> Any:
        if body is None:
            return self.request("GET", f"/api/v1/experiments/{name}")
        return self.request("PATCH", f"/api/v1/experiments/{name}", json=body)

    # ---- sweeps
    def create_sweep(self, spec: dict[str, Any], *, dry_run: bool = False, extend: bool = False) -> Any:
        params = {"dry_run": dry_run, "extend": extend}
        return self.request("POST", "/api/v1/sweeps", json=spec, params=params)

    def sweeps(self, **params: Any) -> Any:
        return self.request("GET", "/api/v1/sweeps", params={k: v for k, v in params.items() if v is not None})

    def sweep(self, ident: str) -> Any:
        return self.request("GET", f"/api/v1/sweeps/{ident}")

    def sweep_report(self, ident: str, fmt: str = "json") -> Any:
        return self.request("GET", f"/api/v1/sweeps/{ident}/report", params={"format": fmt})

    def sweep_plot(self, ident: str, name: str) -> bytes:
        try:
            response = self.http.get(f"/api/v1/sweeps/{ident}/plots/{name}")
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the service at {self.http.base_url} ({exc})") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, response.text)
        return response.content

    def cancel_sweep(self, ident: str) -> Any:
        return self.request("POST", f"/api/v1/sweeps/{ident}/cancel")

    def retry_sweep(self, ident: str) -> Any:
        return self.request("POST", f"/api/v1/sweeps/{ident}/retry")

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
