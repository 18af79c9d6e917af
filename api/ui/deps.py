"""Who is looking at a page: the login cookie, resolved to a principal of the same tokens as REST.

`Viewer` guards every page and fragment (no token, no page); `Actor` guards every action: an admin
token and the session's CSRF token, from the form field or the htmx header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.deps import AppState, Principal, StateDep
from api.ui import session


class LoginRequiredError(Exception):
    """Raised by a page dependency; answered with a redirect to the login form (or 401 for a fragment)."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class ForbiddenError(Exception):
    """A logged-in read token tried to act, or an action came without this session's CSRF token."""


@dataclass(frozen=True)
class UiUser:
    principal: Principal
    cookie: str
    csrf: str

    @property
    def admin(self) -> bool:
        return self.principal.role == "admin"


def who_is(state: AppState, cookie: str | None) -> Principal | None:
    found = session.verify(state.settings.secret, cookie)
    return state.principal_by_fingerprint(found.token_fingerprint) if found else None


def ui_viewer(request: Request, state: StateDep) -> UiUser:
    cookie = request.cookies.get(session.COOKIE)
    principal = who_is(state, cookie)
    if principal is None or cookie is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequiredError(path)
    return UiUser(principal, cookie, session.csrf_token(state.settings.secret, cookie))


Viewer = Annotated[UiUser, Depends(ui_viewer)]


async def ui_actor(request: Request, state: StateDep, user: Viewer) -> UiUser:
    if not user.admin:
        raise ForbiddenError(f"token {user.principal.name!r} is read-only: only admin tokens can act")
    presented = request.headers.get(session.CSRF_HEADER)
    if presented is None:
        form = await request.form()
        value = form.get(session.CSRF_FIELD)
        presented = value if isinstance(value, str) else None
    if not session.csrf_ok(state.settings.secret, user.cookie, presented):
        raise ForbiddenError("the form is stale or did not come from this site (CSRF token missing or wrong)")
    return user


Actor = Annotated[UiUser, Depends(ui_actor)]
