"""Typed dependencies: the service state, a database session, and who is calling."""

from __future__ import annotations

import hmac
import secrets
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from orchestrator.db.session import Database
from orchestrator.jobs.files import job_token_matches
from orchestrator.launchers import Launchers
from orchestrator.leader import Lease
from orchestrator.leader import Role as LeaseRole
from orchestrator.mlflow_bridge import MlflowBridge
from orchestrator.settings import Settings, parse_tokens
from orchestrator.strict import Cursor

Role = Literal["read", "admin"]


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


class AppState:
    """Everything a request handler needs, built once per application."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        self.launchers = Launchers(settings)
        self.mlflow = MlflowBridge(settings.tracking_uri, settings.mlflow_ui_url)
        self.tokens: dict[str, Principal] = {}
        for token, name in parse_tokens(settings.read_tokens).items():
            self.tokens[token] = Principal(name, "read")
        for token, name in parse_tokens(settings.admin_tokens).items():
            self.tokens[token] = Principal(name, "admin")
        if not self.tokens:  # embedded default: one admin token, generated once, readable by the CLI
            self.tokens[ensure_admin_token(settings.home)] = Principal("admin", "admin")

        self.reconciler_thread: threading.Thread | None = None
        self.lease: Lease | None = None

    def reconciler_alive(self) -> bool | None:
        """None when this process runs no reconciler (`orchestrator scheduler` runs it elsewhere)."""
        return None if self.reconciler_thread is None else self.reconciler_thread.is_alive()

    def reconciler_role(self) -> LeaseRole | None:
        """Whether this process's reconciler leads or stands by (another replica leads); None without one."""
        return None if self.lease is None else self.lease.role

    def principal_by_fingerprint(self, fingerprint: str) -> Principal | None:
        """The web UI's cookie names a token by its fingerprint (api/ui/session.py), never by the token."""
        from api.ui.session import fingerprint as of

        found = None
        for known, principal in self.tokens.items():
            if hmac.compare_digest(of(known), fingerprint):
                found = principal
        return found

    def principal(self, token: str) -> Principal | None:
        """Compared in constant time against every known token (no early exit that would time the match)."""
        found = None
        for known, principal in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        return found


def admin_token_path(home: Path) -> Path:
    return home / "admin.token"


def ensure_admin_token(home: Path) -> str:
    path = admin_token_path(home)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.orch
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[Session]:
    """A read session; writes go through `state.db.transaction()` so they commit atomically.

    Opened and closed on the event loop, not in worker threads (two thread hand-offs per request saved):
    opening connects lazily in the handler's thread, and closing does no network I/O (PostgreSQL reads
    autocommit, so there is nothing to roll back; SQLite ends its read transaction locally)."""
    session = state.db.sessions()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
bearer = HTTPBearer(auto_error=False, description="An admin or read-only token (Authorization: Bearer ...).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The token of an `Authorization: Bearer` header, else 401. A function, not a dependency: every
    authenticated request resolves one dependency level fewer."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return credentials.credentials


async def current_principal(state: StateDep, credentials: Credentials) -> Principal:
    principal = state.principal(bearer_token(credentials))
    if principal is None:
        raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    return principal


async def admin_principal(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if principal.role != "admin":
        raise HTTPException(403, f"token {principal.name!r} is read-only")
    return principal


Reader = Annotated[Principal, Depends(current_principal)]
Admin = Annotated[Principal, Depends(admin_principal)]


async def job_caller(request: Request, state: StateDep, credentials: Credentials) -> uuid.UUID:
    """The job a report comes from: the path names it, the token must be that job's own (HMAC of its id).
    Checked before the body is looked at, so a caller without the token learns nothing about the input."""
    token = bearer_token(credentials)
    ident = next((v for k, v in request.path_params.items() if k.endswith("_id")), "")
    try:
        job_id = uuid.UUID(str(ident))
    except ValueError:
        job_id = None
    if job_id is None or not job_token_matches(state.settings.secret, job_id, token):
        raise HTTPException(401, "not this job's token", headers={"WWW-Authenticate": "Bearer"})
    return job_id


JobCaller = Annotated[uuid.UUID, Depends(job_caller)]


#: A cursor from a previous page's `next_page_token` (opaque; anything else is a 422 naming it).
PageToken = Annotated[Cursor | None, Query(description="`next_page_token` of the previous page.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Repeat a POST safely: the same key replays the first reply (1-200 visible ASCII characters).",
    ),
]
