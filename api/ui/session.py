"""The web UI's login session: a signed, expiring HttpOnly cookie naming a token by its fingerprint, and the
CSRF token every state-changing form or htmx request must carry.

The cookie never holds the token itself: it holds sha256(token)[:16], an expiry and an HMAC under the
server secret. A request is accepted only while a configured token still has that fingerprint, so removing
a token from the settings logs its browsers out.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

COOKIE = "orch_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
LIFETIME_S = 12 * 3600


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _mac(secret: bytes, label: str, message: str) -> str:
    return hmac.new(secret, f"{label}\n{message}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Session:
    token_fingerprint: str
    expires: int

    @property
    def cookie(self) -> str:
        return f"{self.token_fingerprint}.{self.expires}"


def issue(secret: bytes, token: str, now: float | None = None) -> str:
    """The cookie value for a freshly verified token."""
    body = Session(fingerprint(token), int(now if now is not None else time.time()) + LIFETIME_S).cookie
    return f"{body}.{_mac(secret, 'ui-session', body)}"


def verify(secret: bytes, value: str | None, now: float | None = None) -> Session | None:
    """The session a cookie stands for, or None when it is absent, forged, malformed or expired."""
    if not value:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    body = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(parts[2], _mac(secret, "ui-session", body)):
        return None
    session = Session(parts[0], int(parts[1]))
    if session.expires < (now if now is not None else time.time()):
        return None
    return session


def csrf_token(secret: bytes, cookie_value: str) -> str:
    """Bound to one login session: a token stolen from another session or forged without the secret fails."""
    return _mac(secret, "ui-csrf", cookie_value)


def csrf_ok(secret: bytes, cookie_value: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(secret, cookie_value), presented or "")
