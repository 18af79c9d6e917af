"""Idempotency-Key for creating POSTs (draft-ietf-httpapi-idempotency-key-header).

The reply is stored in the same transaction as the work, so a retried request either replays the first
reply or, if the first never committed, does the work once. Concurrent requests with one key race on
the record's primary key: the loser rolls back everything it wrote and replays the winner's reply.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from orchestrator.db.models import IdempotencyRecord, utcnow
from orchestrator.db.session import Database
from orchestrator.errors import InvalidInputError

Work = Callable[[Session], tuple[int, dict[str, Any]]]


def request_fingerprint(body: Any) -> str:
    """The request as the service validated it (a model is dumped as JSON first), hashed."""
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json")
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def idempotent_post(state: Any, principal: Any, request: Any, key: str | None, body: Any, work: Work) -> JSONResponse:
    """`run_once` scoped to the caller and the path, with the service's TTL (the body is fingerprinted only
    when a key is given: nothing to compare it with otherwise)."""
    return run_once(
        state.db,
        scope=f"{principal.name}\nPOST\n{request.url.path}",
        key=key,
        fingerprint=request_fingerprint(body) if key is not None else "",
        ttl_s=state.settings.idempotency_ttl_s,
        work=work,
    )


def run_once(db: Database, *, scope: str, key: str | None, fingerprint: str, ttl_s: float, work: Work) -> JSONResponse:
    if key is None:
        with db.transaction() as session:
            status, body = work(session)
        return JSONResponse(body, status_code=status)
    if not 1 <= len(key) <= 200:
        raise InvalidInputError("Idempotency-Key must be 1 to 200 characters", field="Idempotency-Key")
    record_key = hashlib.sha256(f"{scope}\n{key}".encode()).hexdigest()
    for _ in range(20):
        try:
            with db.transaction() as session:
                record = session.get(IdempotencyRecord, record_key)
                if record is not None and utcnow() - record.created_at > timedelta(seconds=ttl_s):
                    session.delete(record)
                    session.flush()
                    record = None
                if record is not None:
                    if record.request_hash != fingerprint:
                        raise InvalidInputError(
                            "this Idempotency-Key was used with a different request body", field="Idempotency-Key"
                        )
                    return JSONResponse(
                        record.response, status_code=record.status_code, headers={"Idempotent-Replayed": "true"}
                    )
                status, body = work(session)
                session.add(
                    IdempotencyRecord(key=record_key, request_hash=fingerprint, status_code=status, response=body)
                )
            return JSONResponse(body, status_code=status)
        except IntegrityError:
            continue  # another request with this key committed first: look again
        except OperationalError as exc:
            if "locked" not in str(exc.orig):
                raise  # the database went away: a 503 the client retries, not a busy key
            continue  # SQLite's write lock timed out: look again
    raise InvalidInputError("Idempotency-Key is busy; retry the request", field="Idempotency-Key")
