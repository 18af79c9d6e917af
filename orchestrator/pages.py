"""Cursor pagination shared by every list: newest first, the cursor names the last item of the page."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, tuple_

from orchestrator.errors import InvalidInputError

#: The shapes of the cursors this service hands out (base64url JSON; decimal event ids).
CURSOR = re.compile(r"[A-Za-z0-9_\-]{1,200}")
EVENT_CURSOR = re.compile(r"[0-9]{1,18}")


def encode_cursor(created_at: datetime, ident: uuid.UUID | int) -> str:
    raw = json.dumps([created_at.isoformat(), str(ident)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    """Strictly parsed: anything but a token this service made is a 422 naming page_token, never a 500."""
    refused = InvalidInputError("page_token is not a token this service issued", field="page_token")
    if not CURSOR.fullmatch(token):
        raise refused
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        if not (isinstance(data, list) and len(data) == 2 and all(isinstance(part, str) for part in data)):
            raise refused
        created = datetime.fromisoformat(data[0])
    except (ValueError, TypeError, RecursionError) as exc:  # binascii.Error and UnicodeDecodeError included
        raise refused from exc
    if created.tzinfo is None or len(data[1]) > 64:
        raise refused
    return created, data[1]


def decode_sequence(token: str) -> int:
    """An event cursor: the decimal id of the last event seen (ASCII digits, at most 18 of them)."""
    if not EVENT_CURSOR.fullmatch(token):
        raise InvalidInputError("page_token is not a token this service issued", field="page_token")
    return int(token)


def cursor_key(page_token: str, id_type: Callable[[str], Any]) -> tuple[datetime, Any]:
    """The (created_at, id) a page token names; a 422 naming page_token if it is not one this service made."""
    created, ident = decode_cursor(page_token)
    try:
        return created, id_type(ident)
    except ValueError as exc:
        raise InvalidInputError("page_token is not a token this service issued", field="page_token") from exc


def newest_first(query: Select[Any], column_time: Any, column_id: Any, after: Any = None) -> Select[Any]:
    """Order newest first, after the cursor `after` (a (time, id) pair of values or of bound parameters)."""
    if after is not None:
        # a row value, not `t < a OR (t = a AND id < b)`: only this form is an index bound (both databases)
        query = query.where(tuple_(column_time, column_id) < tuple_(*after))
    return query.order_by(column_time.desc(), column_id.desc())


def page_after(
    query: Select[Any], column_time: Any, column_id: Any, page_token: str | None, id_type: Callable[[str], Any]
) -> Select[Any]:
    """Newest first; the cursor is the (created_at, id) of the last item of the previous page."""
    after = cursor_key(page_token, id_type) if page_token else None
    return newest_first(query, column_time, column_id, after)


def page(rows: list[Any], page_size: int) -> tuple[list[Any], str | None]:
    """Cut a `page_size + 1` fetch into the page and the token of the next one (None: the list is complete)."""
    more = len(rows) > page_size
    rows = rows[:page_size]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
