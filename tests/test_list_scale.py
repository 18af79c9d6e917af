"""Runs at scale: the cursor is a row-value index bound on both databases (checked with EXPLAIN), a walk
through every page returns each run once in order, filters combine with it, items carry no config, and a
submission to a known experiment writes its rows and reads nothing."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from api.main import create_app
from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Attempt, Experiment, Run, utcnow
from orchestrator.db.session import Database
from orchestrator.lifecycle import Status
from orchestrator.runs import RunFilters, list_runs, resolve_submission, submit_run
from orchestrator.schemas import Page, RunCreate, RunSummary
from tests.support import auth, make_settings

COUNT = 1200


def seed(db_url: str) -> list[uuid.UUID]:
    """COUNT runs, newest last, alternating two experiments and statuses; some share a created_at."""
    db = Database(db_url)
    now = utcnow()
    ids: list[uuid.UUID] = []
    with db.transaction() as session:
        experiments = [Experiment(name=name, description="", eval_policy={}) for name in ("alpha", "beta")]
        session.add_all(experiments)
        session.flush()
        for i in range(COUNT):
            run = _run(
                experiments[i % 2].id,
                f"r{i}",
                status=Status.SUCCEEDED if i % 3 else Status.FAILED,
                created_at=now - timedelta(seconds=(COUNT - i) // 2),  # pairs share a timestamp
            )
            ids.append(run.id)
            session.add(run)
    db.dispose()
    return ids


def _run(experiment_id: uuid.UUID, name: str, status: Status = Status.SUCCEEDED, created_at: Any = None) -> Run:
    return Run(
        id=uuid.uuid4(),
        experiment_id=experiment_id,
        name=name,
        method="dino",
        config={"big": "x" * 2000},
        config_hash="0" * 64,
        launcher="local",
        resources={},
        status=status.value,
        folder=f"/tmp/{name}",
        output_dir=f"/tmp/{name}/train",
        progress={},
        created_at=created_at or utcnow(),
    )


def walk(db: Database, **filters: Any) -> list[uuid.UUID]:
    seen: list[uuid.UUID] = []
    token: str | None = None
    while True:
        with db.sessions() as session:
            runs, token = list_runs(session, RunFilters(page_token=token, **filters), 97)
            seen += [r.id for r in runs]
        if token is None:
            return seen


def test_every_page_once_in_order_with_filters(db_url: str) -> None:
    upgrade(db_url)
    ids = seed(db_url)
    db = Database(db_url)
    try:
        with db.sessions() as session:
            order = session.execute(sa.text("SELECT id, created_at FROM jobs")).all()
        assert len(order) == COUNT
        everything = walk(db)
        assert len(everything) == COUNT and set(everything) == set(ids)
        with db.sessions() as session:
            created = {r.id: (r.created_at, r.id) for r in session.scalars(sa.select(Run))}
        keys = [created[i] for i in everything]
        assert keys == sorted(keys, reverse=True)  # newest first, ties broken by id, no duplicates
        failed_beta = walk(db, status=[Status.FAILED], experiment="beta")
        expected = {ids[i] for i in range(COUNT) if i % 3 == 0 and i % 2 == 1}
        assert set(failed_beta) == expected and len(failed_beta) == len(expected)
        assert walk(db, experiment="gamma") == []  # an experiment that does not exist has no runs
    finally:
        db.dispose()


def _plan(db: Database, statement: str, params: Any) -> str:
    with db.engine.connect() as conn:
        if db.url.startswith("sqlite"):
            return "\n".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params))
        conn.exec_driver_sql("ANALYZE")
        return "\n".join(str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, params))


def test_a_deep_page_is_an_index_range_scan(db_url: str) -> None:
    upgrade(db_url)
    seed(db_url)
    db = Database(db_url)
    try:
        with db.sessions() as session:
            _first, token = list_runs(session, RunFilters(), COUNT // 2)
        statements: list[tuple[str, Any]] = []
        sa.event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append((a[2], a[3])))
        with db.sessions() as session:
            deep, _ = list_runs(session, RunFilters(page_token=token), 50)
        assert len(deep) == 50
        select, params = next((s, p) for s, p in statements if s.lstrip().startswith("SELECT") and "jobs" in s)
        assert "config," not in select.replace("config_hash,", "")  # the config column is not even read
        plan = _plan(db, select, params)
        if db.url.startswith("sqlite"):
            assert "USING INDEX ix_jobs_created ((created_at,id)<(?,?))" in plan, plan
        else:
            assert "ix_jobs_created" in plan and "Index Cond: (ROW(created_at, id) < ROW(" in plan, plan
    finally:
        db.dispose()


def _listed_plan(db: Database, statement: str, params: Any) -> list[str]:
    """The plan of the page subquery alone (what finds the page's runs), one line per step."""
    with db.engine.connect() as conn:
        if db.url.startswith("sqlite"):
            rows = list(conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params))
            inside = {r[0] for r in rows if r[-1] == "CO-ROUTINE listed"}
            for r in rows:  # children are listed after their parent
                if r[1] in inside:
                    inside.add(r[0])
            return [str(r[-1]) for r in rows if r[1] in inside]
        lines = [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, params)]
        start = next(i for i, line in enumerate(lines) if "Limit" in line)
        depth = len(lines[start]) - len(lines[start].lstrip())
        end = next((i for i in range(start + 1, len(lines)) if len(lines[i]) - len(lines[i].lstrip()) <= depth), None)
        return lines[start:end]


def _statement_of(db: Database, filters: RunFilters) -> tuple[str, Any]:
    statements: list[tuple[str, Any]] = []
    listen = lambda *a: statements.append((a[2], a[3]))  # noqa: E731
    sa.event.listen(db.engine, "before_cursor_execute", listen)
    try:
        with db.sessions() as session:
            list_runs(session, filters, 50)
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", listen)
    return next((s, p) for s, p in statements if s.lstrip().startswith("SELECT") and "jobs" in s)


def test_filtered_pages_read_their_runs_through_an_index(db_url: str) -> None:
    """Filtered pages are index walks newest first that stop at the page size, on both databases and without
    statistics (SQLite has none on purpose: its ANALYZE counts the runs outside any sweep as one huge sweep, and
    a sweep's page then scanned every run). By status: jobs (status, created_at, id); it sorted every failed run
    before, 80 ms a page at 100,000 runs on SQLite. By experiment or sweep: runs (experiment_id | sweep_id,
    listed_at, id), the cursor of a deep page an index bound; SQLite sorted a large experiment's runs before."""
    upgrade(db_url)
    seed(db_url)
    db = Database(db_url)
    sqlite = db_url.startswith("sqlite")
    try:
        if not sqlite:  # what autovacuum does after a bulk load
            with db.engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        walks = [
            (RunFilters(status=[Status.FAILED]), "ix_jobs_status_created"),
            (RunFilters(experiment="beta"), "ix_runs_experiment_listed"),
            (RunFilters(sweep=uuid.uuid4()), "ix_runs_sweep_listed"),
        ]
        for filters, index in walks:
            plan = _listed_plan(db, *_statement_of(db, filters))
            assert any(index in line for line in plan), plan
            assert not any(
                step in line
                for step in ("TEMP B-TREE", "Sort", "Seq Scan on jobs", "Seq Scan on runs")
                for line in plan
            ), plan
        with db.sessions() as session:
            _first, token = list_runs(session, RunFilters(experiment="beta"), 300)
        plan = _listed_plan(db, *_statement_of(db, RunFilters(experiment="beta", page_token=token)))
        bound = "(experiment_id=? AND (listed_at,id)<(?,?))" if sqlite else "ROW(listed_at, id) < ROW("
        assert any("ix_runs_experiment_listed" in line for line in plan), plan
        assert any(bound in line for line in plan), plan  # the cursor bounds the index walk
    finally:
        db.dispose()


def test_rest_list_items_carry_no_config(tmp_path: Any) -> None:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}")
    with TestClient(create_app(settings)) as client:
        body = {"experiment": "e", "preset": "tiny_cpu", "launcher": "dryrun"}
        run_id = client.post("/api/v1/runs", json=body, headers=auth()).json()["id"]
        item = client.get("/api/v1/runs", headers=auth()).json()["items"][0]
        assert item["id"] == run_id and "config" not in item and item["config_hash"]
        assert client.get(f"/api/v1/runs/{run_id}", headers=auth()).json()["config"]["method"] == "selfpatch"
        filtered = client.get("/api/v1/runs?method=dino", headers=auth()).json()["items"]
        assert filtered == []
        assert client.get("/api/v1/runs?launcher=Bad;", headers=auth()).status_code == 422


def test_a_page_is_one_select_and_a_read_session_never_writes(db_url: str) -> None:
    upgrade(db_url)
    ids = seed(db_url)
    db = Database(db_url)
    try:
        with db.transaction() as session:
            session.add(Attempt(job_id=ids[-1], number=2, backend="local", state="ended", exit_code=0))
            session.add(Attempt(job_id=ids[-1], number=1, backend="local", state="ended", exit_code=137))
            session.add(Attempt(job_id=ids[-3], number=1, backend="slurm", state="running"))
        statements: list[str] = []
        sa.event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].lstrip().upper()))
        with db.sessions() as session:
            runs, token = list_runs(session, RunFilters(), 50)
            if not db.url.startswith("sqlite"):  # reads autocommit: no BEGIN and ROLLBACK round trips
                assert session.connection().connection.driver_connection.autocommit is True
        assert len(runs) == 50 and token is not None and runs[0].id == ids[-1]
        if not db.url.startswith("sqlite"):  # the pooled connection the read used is transactional again
            with db.transaction() as session:
                assert session.connection().connection.driver_connection.autocommit is False
        assert len(runs) == len({r.id for r in runs}) == 50  # a run with two attempts is still one item
        listed = {r.id: r.attempts for r in runs}
        assert [(a.number, a.exit_code) for a in listed.pop(ids[-1])] == [(1, 137), (2, 0)]
        assert [(a.backend, a.state) for a in listed.pop(ids[-3])] == [("slurm", "running")]
        assert not any(listed.values())
        assert runs[0].experiment_name == "beta" and runs[0].progress == {}
        assert [s.split()[0] for s in statements if not s.startswith("BEGIN")] == ["SELECT"]
        with db.sessions() as session, pytest.raises(RuntimeError, match="read session"):
            found = session.get(Run, ids[-1])
            assert found is not None
            found.name = "renamed"
            session.flush()
        with db.sessions() as session:
            assert session.scalar(sa.select(Run.name).where(Run.id == ids[-1])) == f"r{COUNT - 1}"
    finally:
        db.dispose()


def test_a_submission_to_a_committed_experiment_only_writes_and_a_rolled_back_one_is_forgotten(
    db_url: str, tmp_path: Any
) -> None:
    upgrade(db_url)
    db = Database(db_url)
    settings = make_settings(tmp_path / "home", db_url)
    body = RunCreate(experiment=f"new-{uuid.uuid4().hex[:8]}", preset="tiny_cpu", launcher="dryrun")
    try:
        with pytest.raises(RuntimeError), db.transaction() as session:
            submit_run(session, settings, body, "tester")
            raise RuntimeError("the request fails after the experiment was created")
        statements: list[str] = []
        sa.event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2].lstrip().upper()))
        with db.transaction() as session:
            first = submit_run(session, settings, body, "tester")
        assert any(s.startswith("INSERT INTO EXPERIMENTS") for s in statements)  # created again, not remembered
        statements.clear()
        with db.transaction() as session:
            second = submit_run(session, settings, body, "tester")
        written = [s.split("(")[0].strip() for s in statements if not s.startswith(("BEGIN", "COMMIT"))]
        if db.url.startswith("sqlite"):  # in process: three statements cost no round trip
            assert written == ["INSERT INTO JOBS", "INSERT INTO RUNS", "INSERT INTO EVENTS"], statements
        else:  # one statement, one round trip: the job, run and event rows as data-modifying CTEs
            assert written == ["WITH SUBMITTED_JOB AS"], statements
        with db.sessions() as session:
            owners = session.execute(
                sa.select(Run.experiment_id).where(Run.id.in_([first.id, second.id])).distinct()
            ).scalars()
            (owner,) = list(owners)
            assert session.scalar(sa.select(Experiment.name).where(Experiment.id == owner)) == body.experiment
            keys = session.execute(sa.select(Run.created_at, Run.listed_at).where(Run.id == second.id)).one()
            assert keys == (second.created_at, second.created_at)  # the run's list key is its job's created_at
    finally:
        db.dispose()


def test_a_preset_request_is_resolved_once_per_version_of_its_files(tmp_path: Path, monkeypatch: Any) -> None:
    """Edits to a preset, or to the preset it extends, are seen at the next submission; nothing else is."""
    import orchestrator.runs
    import trainer.presets

    for name in ("tiny_cpu", "scenes_cpu"):
        shutil.copy(trainer.presets.preset_dir() / f"{name}.yaml", tmp_path / f"{name}.yaml")
    (tmp_path / "tiny_cpu.yaml").write_text("_base_: scenes_cpu\noptim:\n  epochs: 2\n")
    monkeypatch.setattr(trainer.presets, "preset_dir", lambda: tmp_path)
    monkeypatch.setattr(orchestrator.runs, "_RESOLVED", {})
    body = RunCreate(experiment="e", preset="tiny_cpu", overrides=["optim.lr=0.001"])
    first = resolve_submission(body)
    assert resolve_submission(body) is first and first.config.optim.epochs == 2 and first.config.optim.lr == 0.001
    assert resolve_submission(body.model_copy(update={"overrides": ["optim.lr=0.002"]})).config.optim.lr == 0.002

    base = (tmp_path / "scenes_cpu.yaml").read_text().replace("batch_size_per_gpu: 64", "batch_size_per_gpu: 128")
    (tmp_path / "scenes_cpu.yaml").write_text(base)
    second = resolve_submission(body)
    assert second is not first and second.config.optim.batch_size_per_gpu == 128
    assert second.config_hash == second.config.config_hash() != first.config_hash
    assert second.as_json == second.config.model_dump(mode="json")


def test_a_rest_page_is_the_validated_run_summary_page_byte_for_byte(tmp_path: Path, db_url: str) -> None:
    """GET /runs serializes its rows without building models, so the page must equal, byte for byte, what
    validating it as Page[RunSummary] and dumping it again gives: no field missing, extra, renamed or
    differently formatted (UTC datetimes, enums, floats, nested attempts, nulls)."""
    settings = make_settings(tmp_path / "home", db_url)
    with TestClient(create_app(settings)) as client:
        first = client.post(
            "/api/v1/runs", json={"experiment": "e", "preset": "tiny_cpu", "launcher": "dryrun"}, headers=auth()
        )
        run_id = uuid.UUID(first.json()["id"])
        db = client.app.state.orch.db  # type: ignore[attr-defined]
        with db.transaction() as session:
            run = session.get(Run, run_id)
            run.progress = {"epoch": 3, "loss": 6.25, "collapsed": {"reason": "teacher uniform"}}
            run.mlflow_run_id, run.mlflow_experiment_id = "abc123", "7"
            run.started_at = run.ended_at = utcnow()
            run.status, run.status_reason = Status.FAILED.value, "exit 137"
            session.add(Attempt(job_id=run_id, number=2, backend="slurm", state="ended", exit_code=0, host="n1"))
            session.add(
                Attempt(
                    job_id=run_id, number=1, backend="slurm", state="ended", exit_code=137, accelerator_seconds=12.5
                )
            )
        client.post(
            "/api/v1/runs", json={"experiment": "f", "preset": "tiny_cpu", "launcher": "dryrun"}, headers=auth()
        )
        response = client.get("/api/v1/runs", params={"page_size": 1, "status": "failed"}, headers=auth())
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    page_type = TypeAdapter(Page[RunSummary])
    assert page_type.dump_json(page_type.validate_json(response.content)) == response.content
    item = response.json()["items"][0]
    assert item["id"] == str(run_id) and item["status"] == "failed" and item["collapsed"] == "teacher uniform"
    assert [(a["number"], a["exit_code"], a["accelerator_seconds"]) for a in item["attempts"]] == [
        (1, 137, 12.5),
        (2, 0, None),
    ]
    assert item["created_at"].endswith("Z") and item["attempts"][0]["submitted_at"].endswith("Z")
    assert response.json()["next_page_token"] is None


def test_timestamps_read_back_in_utc_whatever_the_session_time_zone(db_url: str) -> None:
    """PostgreSQL sessions are pinned to UTC so values pass through as read; a session in another zone (a
    connection made elsewhere) still reads the same instants as UTC-aware datetimes."""
    upgrade(db_url)
    db = Database(db_url)
    stamp = utcnow().replace(microsecond=123456)
    try:
        with db.transaction() as session:
            session.add(Experiment(name="tz", description="", eval_policy={}, created_at=stamp))
        with db.sessions() as session:
            read = session.scalar(sa.select(Experiment.created_at).where(Experiment.name == "tz"))
        assert read == stamp and read is not None and read.tzinfo is UTC
        if db.url.startswith("postgresql"):
            tokyo = sa.create_engine(db.url, connect_args={"options": "-c TimeZone=Asia/Tokyo"})
            with tokyo.connect() as connection:
                assert connection.exec_driver_sql("SHOW TimeZone").scalar() == "Asia/Tokyo"
                other = connection.execute(sa.select(Experiment.created_at)).scalar()
            tokyo.dispose()
            assert other == stamp and other is not None and other.tzinfo is UTC
    finally:
        db.dispose()
