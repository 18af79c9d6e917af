"""Scale-out: one active reconciler per PostgreSQL database (an advisory lock, taken over when its holder
dies), one service process per SQLite file (a flock, freed when its holder dies)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.leader import LOCK_KEY, PostgresLease, claim_writer, lock_path
from tests.support import ADMIN, REPO, free_port, make_settings, wait_for

ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")
POSTGRESQL = pytest.param("postgresql", marks=pytest.mark.services)
CLASSID, OBJID = (LOCK_KEY & 0xFFFFFFFFFFFFFFFF) >> 32, LOCK_KEY & 0xFFFFFFFF
#: Who holds the reconciler's lock, as the README's query asks it.
HOLDERS = sa.text(
    "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :classid AND l.objid = :objid"
).bindparams(classid=CLASSID, objid=OBJID)


def holders(url: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return [(int(pid), str(name)) for pid, name in connection.execute(HOLDERS)]
    finally:
        engine.dispose()


def roles(*leases: PostgresLease) -> list[str]:
    return [lease.role for lease in leases]


def terminate(url: str, backend: int) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.select(sa.func.pg_terminate_backend(backend))).scalar_one()
    finally:
        engine.dispose()


class Process:
    """`orchestrator scheduler` (or `serve`) as a process, its log in a file, killable without warning."""

    def __init__(self, home: Path, db_url: str, *args: str) -> None:
        self.home, self.args = home, args or ("scheduler",)
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / f"{self.args[0]}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ORCH_")},
            "ORCH_HOME": str(home),
            "ORCH_DATABASE_URL": db_url,
            "ORCH_ADMIN_TOKENS": f"admin:{ADMIN}",
            "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "ORCH_RECONCILE_INTERVAL_S": "0.5",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [ORCHESTRATOR, *self.args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def run(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ORCHESTRATOR, *self.args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown, no unlock
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


# ---------------------------------------------------------------------------------------------- SQLite


def test_the_sqlite_claim_is_reentrant_in_a_process_and_exclusive_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orch.db'}"
    first, second = claim_writer(url), claim_writer(url)  # the demo and the tests build several apps per process
    lock = lock_path(tmp_path / "orch.db")
    assert lock.read_text().strip() == str(os.getpid())
    probe = [sys.executable, "-c", f"from orchestrator.leader import claim_writer; claim_writer({url!r})"]
    refused = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and f"in use by another orchestrator process (pid {os.getpid()}" in refused.stderr
    first.release()
    first.release()  # a claim releases once, however often it is asked to
    assert subprocess.run(probe, cwd=REPO, capture_output=True, timeout=120).returncode != 0  # `second` holds it
    second.release()
    assert subprocess.run(probe, cwd=REPO, capture_output=True, timeout=120).returncode == 0
    assert claim_writer("postgresql+psycopg://nobody@127.0.0.1/none").path is None  # nothing to claim there


def test_sqlite_refuses_a_second_service_process_until_the_first_dies(tmp_path: Path, processes: list[Process]) -> None:
    url = f"sqlite:///{tmp_path / 'orch.db'}"
    lock = lock_path(tmp_path / "orch.db")
    first = Process(tmp_path / "first", url).start()
    processes.append(first)
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), 120, "the first to claim it")

    for args in (("scheduler",), ("serve", "--port", "1", "--no-reconciler")):  # a reconciler or an API
        refused = Process(tmp_path / "second", url, *args).run()
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode != 0, refused.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
        assert f"in use by another orchestrator process (pid {first.pid}" in lines[0]
        assert "only one `serve` or `scheduler` process" in lines[0]
    assert first.alive()

    first.kill()  # the kernel drops its flock with the process
    third = Process(tmp_path / "third", url).start()
    processes.append(third)
    wait_for(lambda: lock.read_text().strip() == str(third.pid), 120, "a new process to claim it")
    assert third.alive(), third.log()


def test_readyz_says_this_process_leads_on_sqlite_and_none_without_a_reconciler(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}")
    with TestClient(create_app(settings, run_reconciler=True)) as leading, TestClient(create_app(settings)) as api:
        assert leading.get("/readyz").json()["reconciler"] == "leader"
        assert api.get("/readyz").json()["reconciler"] is None


# ------------------------------------------------------------------------------------------ PostgreSQL


@pytest.mark.parametrize("db_url", [POSTGRESQL], indirect=True)
def test_two_leases_on_one_database_elect_one_and_the_other_takes_over(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.leader")
    a, b = PostgresLease(db_url), PostgresLease(db_url)
    try:
        assert a.held() and roles(a) == ["leader"]
        for _ in range(3):  # every pass asks again: the answers stay put
            assert not b.held() and roles(b) == ["standby"]
            assert a.held()
        [(backend, name)] = holders(db_url)
        assert f"pid={os.getpid()}" in name

        terminate(db_url, backend)  # the leader's connection dies (as with its process or host)
        wait_for(b.held, 30, "the standby to take over", every=0.1)
        assert not a.held() and roles(a, b) == ["standby", "leader"]  # a steps down at its next pass
        assert "lost leadership" in caplog.text and "became the leader" in caplog.text
        assert not a.held()  # and keeps asking without a fight

        b.release()  # a leader that stops frees the lock at once
        wait_for(a.held, 30, "the other to lead again", every=0.1)
        assert len(holders(db_url)) == 1
    finally:
        a.release()
        b.release()
    assert holders(db_url) == []


@pytest.mark.parametrize("db_url", [POSTGRESQL], indirect=True)
def test_api_replicas_with_reconcilers_report_one_leader_in_readyz(tmp_path: Path, db_url: str) -> None:
    one, two = (make_settings(tmp_path / name, db_url) for name in ("one", "two"))
    with TestClient(create_app(one, run_reconciler=True)) as a, TestClient(create_app(two, run_reconciler=True)) as b:

        def roles() -> list[Any]:
            return sorted(client.get("/readyz").json()["reconciler"] for client in (a, b))

        wait_for(lambda: roles() == ["leader", "standby"], 30, "one leader and one standby", every=0.1)


@pytest.mark.parametrize("db_url", [POSTGRESQL], indirect=True)
def test_two_schedulers_elect_one_leader_and_the_other_takes_over_when_it_is_killed(
    tmp_path: Path, db_url: str, processes: list[Process]
) -> None:
    pair = [Process(tmp_path / name, db_url) for name in ("a", "b")]
    processes.extend(process.start() for process in pair)  # together: their migrations queue on a lock

    def leading() -> list[Process]:
        return [process for process in pair if "became the leader" in process.log()]

    def running(*processes: Process) -> Literal[False]:
        """False while they run (for `running(...) or probe()`); fails at once, not at the deadline, when one
        died (a migration race once killed one)."""
        for process in processes:
            assert process.alive(), process.log()
        return False

    def lease_sessions() -> int:
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                query = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'orchestrator lease %'"
                return int(connection.execute(sa.text(query)).scalar_one())
        finally:
            engine.dispose()

    [leader] = wait_for(lambda: running(*pair) or leading(), 120, "a scheduler to lead")
    wait_for(lambda: running(*pair) or lease_sessions() == 2, 120, "the standby to ask for the lock too")
    [standby] = [process for process in pair if process is not leader]
    assert leading() == [leader]  # exactly one: the standby has asked and was refused
    [(_, name)] = holders(db_url)
    assert f"pid={leader.pid} " in name

    leader.kill()
    killed = time.monotonic()
    wait_for(lambda: running(standby) or "became the leader" in standby.log(), 30, "the take-over", every=0.1)
    took = time.monotonic() - killed
    [(_, name)] = holders(db_url)
    assert f"pid={standby.pid} " in name
    assert standby.alive(), standby.log()
    print(f"take-over after SIGKILL: {took:.1f} s")


def test_a_separate_scheduler_serves_its_reconciler_metrics_on_its_own_port(tmp_path: Path) -> None:
    port = free_port()
    proc = Process(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}", "scheduler", "--metrics-port", str(port))
    proc.start()
    try:

        def passes() -> float:
            assert proc.alive(), proc.log()
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return 0.0
            found = re.search(r"^orch_reconcile_pass_seconds_count (\S+)$", text, re.MULTILINE)
            return float(found.group(1)) if found else 0.0

        wait_for(lambda: passes() >= 2, 120, "the scheduler's passes on its metrics port")
        assert 'orch_jobs{kind="train",status="queued"} 0.0' in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        proc.stop()
