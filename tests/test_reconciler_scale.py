"""The reconciler's cost follows what changes, on both databases: one query per pass for every running job,
no lock for a healthy one, one locking transaction for a batch of changed ones, an index for open attempts;
the job logs are read incrementally, past a line only once its effect has committed; SQLite's writers queue
in arrival order."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from benchmarks.reconciler_scale import RunningScheduler, grow, seed
from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Checkpoint, Event
from orchestrator.db.session import Database, FifoLock
from orchestrator.jobs.tails import LogTails
from orchestrator.launchers import Launchers
from orchestrator.reconciler import PassStats, Reconciler
from tests.support import make_settings, wait_for


class Statements:
    """Every SQL statement the engine runs while recording."""

    def __init__(self, db: Database) -> None:
        self.seen: list[str] = []
        self.recording = False
        sa.event.listen(db.engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if self.recording:
            self.seen.append(" ".join(statement.split()))

    def during(self, action: Any) -> list[str]:
        self.seen, self.recording = [], True
        try:
            action()
        finally:
            self.recording = False
        return self.seen


def writes(statements: list[str]) -> list[str]:
    """Statements that write or lock (SQLite's writers take the database lock at BEGIN IMMEDIATE)."""
    return [
        s
        for s in statements
        if s.split(" ", 1)[0] in ("INSERT", "UPDATE", "DELETE") or "FOR UPDATE" in s or s == "BEGIN IMMEDIATE"
    ]


def healthy(db_url: str, home: Path, active: int, finished: int) -> tuple[Reconciler, Database, list[Path]]:
    """`active` running runs (the scheduler says running, heartbeats fresh, logs growing) and `finished` ones."""
    upgrade(db_url)
    logs = seed(db_url, home, active=active, finished=finished)
    settings = make_settings(home, db_url, heartbeat_timeout_s=3600)
    db = Database(db_url)
    return Reconciler(settings, db, Launchers(settings, fixed={"bench": RunningScheduler()})), db, logs


def test_running_jobs_cost_one_query_and_no_lock_until_something_changes(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    reconciler, db, logs = healthy(db_url, home, active=40, finished=200)
    try:
        recorder = Statements(db)
        assert reconciler.reconcile_once().jobs == 40  # the first pass reads every log from its start
        grow(logs, 1, checkpoint_every=None)  # metrics lines only
        quiet = recorder.during(reconciler.reconcile_once)
        assert writes(quiet) == [], writes(quiet)
        tracked = [s for s in quiet if "LEFT OUTER JOIN attempts ON attempts.job_id = jobs.id" in s]
        assert len(tracked) == 1, quiet  # every running job's state in one query

        more = seed(db_url, home, active=40, finished=0)  # twice the running jobs: the same statements
        reconciler.reconcile_once()
        grow([*logs, *more], 2, checkpoint_every=None)
        assert len(recorder.during(reconciler.reconcile_once)) == len(quiet)

        grow(logs[:3], 3, checkpoint_every=1)  # three runs log a checkpoint: one transaction locks them
        changed = recorder.during(reconciler.reconcile_once)
        if db.url.startswith("sqlite"):
            assert sum(s == "BEGIN IMMEDIATE" for s in changed) == 1, changed
        else:
            locks = [s for s in changed if "FOR UPDATE" in s]
            assert len(locks) == 1 and "SKIP LOCKED" in locks[0], locks
        with db.sessions() as session:
            recorded = session.scalars(sa.select(Checkpoint.path)).all()
        logged = sorted(log.parent.parent.name for log in logs[:3])
        assert sorted(Path(p).parent.parent.name for p in recorded) == logged
        assert writes(recorder.during(reconciler.reconcile_once)) == []  # recorded once, not again
    finally:
        db.dispose()


def test_what_a_pass_looks_for_is_found_through_indexes_not_history(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    home = tmp_path / "home"
    seed(db_url, home, active=5, finished=500)
    db = Database(db_url)
    try:
        settings = make_settings(home, db_url)
        reconciler = Reconciler(settings, db, Launchers(settings), mlflow=SimpleNamespace())  # type: ignore[arg-type]
        recorder = Statements(db)
        statements = recorder.during(reconciler._tracked) + recorder.during(
            lambda: reconciler._sync_mlflow(PassStats())
        )
        tracked, unsynced = (
            next(s for s in statements if "FROM jobs" in s and what in s) for what in ("attempts", "mlflow")
        )
        assert " runs " not in tracked and " evaluations " not in tracked  # the jobs table alone
        sqlite = db.url.startswith("sqlite")
        for statement, index in ((tracked, "ix_attempts_state"), (unsynced, "ix_jobs_unsynced")):
            literal = statement.replace("?", "'x'") if sqlite else re.sub(r"%\(\w+\)s", "'x'", statement)
            with db.engine.connect() as conn:
                if sqlite:
                    plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + literal))
                else:  # with few rows a scan may be cheaper: check that the index answers the predicate at all
                    conn.exec_driver_sql("ANALYZE")
                    conn.exec_driver_sql("SET enable_seqscan = off")
                    plan = "\n".join(str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + literal))
            assert index in plan, plan
    finally:
        db.dispose()


def test_a_log_is_read_once_and_a_line_only_when_complete(tmp_path: Path) -> None:
    tails, log = LogTails(), tmp_path / "log.jsonl"
    assert tails.read(log).lines == [] and tails.read(log).end is None  # not there yet
    log.write_text('{"iteration": 1}\n{"iteration": 2')  # the second line is being written
    first = tails.read(log)
    assert first.lines == ['{"iteration": 1}']
    tails.advance(first)
    with log.open("a") as handle:
        handle.write('}\n{"event": "checkpoint"}\n')
    second = tails.read(log)
    assert second.lines == ['{"iteration": 2}', '{"event": "checkpoint"}'] and second.any('"checkpoint"')
    assert tails.read(log).lines == second.lines  # not advanced: read again
    tails.advance(second)
    assert tails.read(log).lines == []
    log.unlink()
    log.write_text('{"iteration": 0}\n')  # a new file under the same name (a restarted job): from its start
    assert tails.read(log).lines == ['{"iteration": 0}']


def test_lines_are_passed_only_when_the_transaction_acting_on_them_commits(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    tails, log = LogTails(), tmp_path / "log.jsonl"
    log.write_text(json.dumps({"event": "checkpoint"}) + "\n")
    try:
        try:
            with db.transaction() as session:
                tails.advance_on_commit(session, tails.read(log))
                raise RuntimeError("the transaction fails")
        except RuntimeError:
            pass
        assert tails.read(log).lines != []  # rolled back: the line is read again
        with db.transaction() as session:
            tails.advance_on_commit(session, tails.read(log))
        assert tails.read(log).lines == []
        tails.sweep()
        tails.sweep()  # nobody asked about the file during a whole pass: forgotten, read from its start
        assert tails.read(log).lines != []
    finally:
        db.dispose()


def test_a_collapse_logged_while_running_becomes_an_event(db_url: str, tmp_path: Path) -> None:
    reconciler, db, logs = healthy(db_url, tmp_path / "home", active=2, finished=0)
    try:
        reconciler.reconcile_once()
        line = {"event": "collapse", "head": "cls", "mode": "uniform", "iteration": 30, "ratio": 0.99}
        with logs[1].open("a") as handle:
            handle.write(json.dumps({**line, "reason": "teacher near uniform"}) + "\n")
        reconciler.reconcile_once()
        with db.sessions() as session:
            events = session.scalars(sa.select(Event).where(Event.kind == "collapsed")).all()
        assert [e.reason for e in events] == ["teacher near uniform"]
        assert str(events[0].job_id) == logs[1].parent.parent.name
    finally:
        db.dispose()


def test_sqlite_writers_take_their_turn_in_arrival_order(tmp_path: Path) -> None:
    lock, order, started = FifoLock(), [], []
    lock.__enter__()  # held: everyone below queues

    def writer(i: int) -> None:
        started.append(i)
        with lock:
            order.append(i)

    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=writer, args=(i,)))
        threads[-1].start()
        wait_for(lambda i=i: i in started and len(lock._waiters) == i + 1, 5, f"writer {i} to queue")
    lock.__exit__(None, None, None)
    for thread in threads:
        thread.join(5)
    assert order == list(range(8))
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with db.transaction(), pytest.raises(RuntimeError, match="inside another"), db.transaction():
            pass
    finally:
        db.dispose()
