"""Cursor pagination shared by every list: newest first, the cursor names the last item of the page."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_

from orchestrator.errors import InvalidInputError


def encode_cursor(created_at: datetime, ident: uuid.UUID | int) -> str:
    raw = json.dumps([created_at.isoformat(), str(ident)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        created, ident = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), str(ident)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError("page_token is not a token this service issued", field="page_token") from exc


def page_after(
    query: Select[Any], column_time: Any, column_id: Any, page_token: str | None, id_type: Callable[[str], Any]
) -> Select[Any]:
    """Newest first; the cursor is the (created_at, id) of the last item of the previous page."""
    if page_token:
        created, ident = decode_cursor(page_token)
        try:
            key = id_type(ident)
        except ValueError as exc:
            raise InvalidInputError("page_token is not a token this service issued", field="page_token") from exc
        query = query.where(or_(column_time < created, and_(column_time == created, column_id < key)))
    return query.order_by(column_time.desc(), column_id.desc())


def page(rows: list[Any], page_size: int) -> tuple[list[Any], str | None]:
    """Cut a `page_size + 1` fetch into the page and the token of the next one (None: the list is complete)."""
    more = len(rows) > page_size
    rows = rows[:page_size]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
