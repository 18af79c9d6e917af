"""Who may write: one active reconciler per PostgreSQL database, one service process per SQLite file.

The REST API keeps nothing in memory, so any number of replicas may share one PostgreSQL database. The
reconciler may not run twice at once: two would each count the launchers' free slots, poll the same
scheduler jobs and race to settle them. Every process that runs one therefore asks a `Lease` before each
pass, and only the holder reconciles; the others stand by and try again every pass.

* **PostgreSQL**: a session-level advisory lock, `pg_try_advisory_lock(LOCK_KEY)`, taken on one
  connection of its own that stays open while the process leads. The server drops the lock with that
  connection, so a leader that dies (SIGKILL, lost host) frees it at once and a standby takes over at
  its next pass; a leader whose connection breaks steps down before its next pass, and a leader whose
  host vanishes is dropped by the server within seconds (keepalives on both ends). Advisory locks are
  scoped to one database, so services on different databases of one server do not compete. The lock
  needs session-level connections: point the service at PostgreSQL itself, or at a pooler in session
  mode (PgBouncer's transaction mode would hand the lock to another client's session).
* **SQLite**: one process only. `claim_writer` takes an exclusive `flock` on `<database>.writer.lock`
  for the life of the process (`serve`, with or without its reconciler, and `scheduler`), with the pid
  of the holder written inside; a second process on the same file is refused with a one-line message
  naming that pid. The kernel releases the lock when the process dies, so a killed service restarts at
  once. Within one process the claim is re-entrant (the demo and the tests build several applications on
  one database), and the reconciler's lease there is always held.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

log = logging.getLogger("orchestrator.leader")


def lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key (bigint) from a name: the first 8 bytes of its sha256, signed."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


#: The name the reconciler's advisory lock is derived from; every service on one database uses it.
LOCK_NAME = "selfpatch-orchestrator/reconciler"
#: The reconciler's key, -578695718375692645. In `pg_locks`: classid 4160229199, objid 1764583067, objsubid 1;
#: `SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype =
#: 'advisory' AND l.classid = 4160229199 AND l.objid = 1764583067` names the leader (pid and host).
LOCK_KEY = lock_key(LOCK_NAME)
#: Held for the migration transaction, so replicas that start together migrate one after the other.
MIGRATION_LOCK_KEY = lock_key("selfpatch-orchestrator/migrations")
#: Both ends of the lease connection notice a lost peer within about 11 s instead of TCP's hours: the
#: client steps down, and the server ends the session (freeing the lock) when the leader's host is gone.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
    "-c tcp_user_timeout=10000",
}

Role = Literal["leader", "standby"]


class DatabaseBusyError(RuntimeError):
    """Another process already writes this SQLite database."""


class Lease(Protocol):
    """The right to reconcile, asked for before every pass."""

    def held(self) -> bool:
        """Whether this process leads now: acquires when free, checks the connection when held."""
        ...

    @property
    def role(self) -> Role:
        """The last answer of `held()`, without touching the database (for /readyz)."""
        ...

    def release(self) -> None:
        """Step down and free what the lease holds."""
        ...


# ---------------------------------------------------------------------------------------------- SQLite


@dataclass
class _FileLock:
    fd: int
    count: int


_claims: dict[Path, _FileLock] = {}
_claims_lock = threading.Lock()


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for PostgreSQL and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).resolve()


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".writer.lock")


class WriterClaim:
    """This process's claim on a SQLite database (nothing for PostgreSQL); `release()` once per claim."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._released = path is None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        assert self.path is not None
        with _claims_lock:
            held = _claims[self.path]
            held.count -= 1
            if held.count == 0:
                del _claims[self.path]
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)


def claim_writer(url: str) -> WriterClaim:
    """Make this process the only one that serves a SQLite database, or raise `DatabaseBusyError` naming the
    process that does. Re-entrant within a process; a no-op for PostgreSQL."""
    database = sqlite_path(url)
    if database is None:
        return WriterClaim(None)
    path = lock_path(database)
    with _claims_lock:
        if path in _claims:
            _claims[path].count += 1
            return WriterClaim(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the jobs this process starts
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseBusyError(
                f"{database} is in use by another orchestrator process (pid {holder}, lock {path}); on SQLite "
                "only one `serve` or `scheduler` process may use a database: stop that one, or use PostgreSQL "
                "to run several"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _claims[path] = _FileLock(fd, 1)
        return WriterClaim(path)


class SqliteLease:
    """On SQLite this process is the only writer (its claim says so), so it always leads."""

    def __init__(self, url: str) -> None:
        self._claim = claim_writer(url)

    def held(self) -> bool:
        return True

    @property
    def role(self) -> Role:
        return "leader"

    def release(self) -> None:
        self._claim.release()


# ------------------------------------------------------------------------------------------ PostgreSQL


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class PostgresLease:
    """The reconciler's advisory lock on one dedicated connection (no pool: it is never handed to anyone)."""

    def __init__(self, url: str, key: int = LOCK_KEY) -> None:
        self.key = key
        name = f"orchestrator lease pid={os.getpid()} host={socket.gethostname()}"[:63]  # who leads, in SQL
        self.engine = create_engine(url, poolclass=NullPool, connect_args={**PG_CONNECT_ARGS, "application_name": name})
        self._connection: Connection | None = None
        self._leading = False
        self._failing = False
        self._lock = threading.Lock()

    @property
    def role(self) -> Role:
        return "leader" if self._leading else "standby"

    def held(self) -> bool:
        with self._lock:
            try:
                if self._connection is None:
                    # autocommit: the lock belongs to the session, and no transaction stays open for hours
                    self._connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                if self._leading:
                    self._connection.execute(text("SELECT 1"))  # alive, so the session and its lock are
                elif self._connection.execute(select(func.pg_try_advisory_lock(self.key))).scalar_one():
                    self._leading = True
                    log.info("became the leader: this process reconciles (advisory lock %d)", self.key)
                self._failing = False
            except Exception as exc:  # any failure means the lock may be gone: never reconcile on a doubt
                self._drop(first_line(exc))
            return self._leading

    def _drop(self, reason: str) -> None:
        if self._leading:
            log.warning("lost leadership (%s): reconciling stops until the lock is taken again", reason)
        elif not self._failing:
            log.warning("cannot reach the database for the reconciler's lock (%s); retrying every pass", reason)
        self._leading, self._failing = False, True
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()
                connection.close()
            except Exception:
                log.debug("closing a broken lease connection", exc_info=True)

    def release(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                try:
                    if self._leading:
                        connection.execute(select(func.pg_advisory_unlock(self.key)))
                        log.info("released leadership")
                    connection.close()
                except Exception:
                    log.debug("releasing the lease", exc_info=True)  # the server drops it with the session
            self._leading = False
            self.engine.dispose()


def open_lease(url: str) -> Lease:
    """The reconciler's lease for the database at `url` (raises `DatabaseBusyError` on a busy SQLite file)."""
    if make_url(url).get_backend_name() == "sqlite":
        return SqliteLease(url)
    return PostgresLease(url)
