"""Engines and transactions for SQLite (embedded default, WAL) and PostgreSQL (production)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pydantic_core import from_json
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs: Any) -> Engine:
    """JSON columns are parsed by pydantic-core (several times faster than `json.loads`, same values: a page of
    runs parses two JSON columns per row)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, json_deserializer=from_json, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            # writers take the lock at BEGIN (IMMEDIATE) and queue instead of failing on a lock upgrade;
            # readers begin DEFERRED and, with WAL, never wait for a writer
            mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    # no ping per checkout (a round trip on every request): a connection a server restart broke fails one
    # statement, SQLAlchemy then invalidates the whole pool, and clients retry with their idempotency keys
    options: dict[str, Any] = {"pool_pre_ping": False, "pool_recycle": 1800}
    if "poolclass" not in kwargs:
        options.update(pool_size=10, max_overflow=20)
    # sessions in UTC whatever the server's default: psycopg then returns `datetime.UTC`-aware values, which
    # UTCDateTime passes through as they are (a page of runs reads 350 of them)
    connect_args = {"options": "-c TimeZone=UTC", **kwargs.pop("connect_args", {})}
    return create_engine(url, json_deserializer=from_json, connect_args=connect_args, **options, **kwargs)


class FifoLock:
    """A lock handed to its waiters in arrival order. SQLite has one writer at a time; left to its busy
    handler, waiting writers poll with growing sleeps and the unlucky ones wait seconds (the p99 under load).
    Queued here, each write transaction of this process waits only for those that arrived before it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()
        self._held = False
        self._owner: int | None = None

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._guard:
            if not self._held:
                self._held, self._owner = True, me
                return
            if self._owner == me:  # SQLite would wait on itself for its busy timeout, then fail
                raise RuntimeError("a write transaction inside another one on the same SQLite database")
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by the holder that hands over to us
        self._owner = me

    def __exit__(self, *_exc: object) -> None:
        with self._guard:
            self._owner = None
            if self._waiters:
                self._waiters.popleft().release()  # still held: ownership passes directly
            else:
                self._held = False


def _refuse_writes(session: Session, _context: Any, _instances: Any) -> None:
    """A read session never writes (on PostgreSQL it autocommits each statement): writes take `transaction()`."""
    raise RuntimeError("a write on a read session: use Database.transaction() so it commits atomically")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # reads: on PostgreSQL without BEGIN/ROLLBACK (two round trips per request saved; under READ COMMITTED
        # each statement took its own snapshot anyway); on SQLite a deferred BEGIN keeps one WAL snapshot
        reader = (
            self.engine if url.startswith("sqlite") else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self.sessions = sessionmaker(reader, expire_on_commit=False)
        event.listen(self.sessions, "before_flush", _refuse_writes)
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._writers = sessionmaker(writer, expire_on_commit=False)
        # SQLite: one writer at a time, queued in order (one process writes a database: see leader.py)
        self._write_turn: FifoLock | nullcontext[None] = FifoLock() if url.startswith("sqlite") else nullcontext()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits together or not at all."""
        with self._write_turn, self._writers() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
