"""Reconciler pass time as active and finished work grow, on SQLite and PostgreSQL.

Each case records `active` running pretraining runs (each with an open attempt on a scheduler that says
"running", a fresh heartbeat and a `log.jsonl` the trainer appends to) and `finished` succeeded runs, then
times steady-state passes of the real reconciler. Between passes every running run's log grows by one
metrics line, as a training job's does; one run in a hundred also logs a new checkpoint, which the pass must
record. The scheduler is an in-memory stand-in answering one batched poll (as `squeue` does), so the
table measures the service, not SLURM.

Baselines in the same run: the 100-active row of each database (growth with active work, ideally linear at
a small per-run cost) and the 10k-finished row (cost in finished work, ideally flat).

    python benchmarks/reconciler_scale.py                   # SQLite, and PostgreSQL when reachable
    python benchmarks/reconciler_scale.py --full            # adds 5,000 active and 100k finished
    python benchmarks/reconciler_scale.py --db sqlite --active 1000 --finished 10000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Table, create_engine, insert, text  # noqa: E402

from orchestrator.db.migrate import upgrade  # noqa: E402
from orchestrator.db.models import Attempt, Experiment, Job, Run, utcnow  # noqa: E402
from orchestrator.db.session import Database  # noqa: E402
from orchestrator.launchers import Launchers  # noqa: E402
from orchestrator.launchers.base import JobSpec, JobState, JobStatus  # noqa: E402
from orchestrator.reconciler import Reconciler  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class RunningScheduler:
    """Every job it is asked about is running on a node; one call answers a whole batch."""

    name = "bench"

    def __init__(self) -> None:
        self.started = utcnow() - timedelta(minutes=5)
        self.polled = 0

    def poll_many(self, job_ids: list[str]) -> dict[str, JobStatus]:
        self.polled += len(job_ids)
        status = JobStatus(JobState.RUNNING, host="node-1", started_at=self.started)
        return dict.fromkeys(job_ids, status)

    def poll(self, job_id: str) -> JobStatus:
        return self.poll_many([job_id])[job_id]

    def submit(self, spec: JobSpec) -> str:
        raise AssertionError("nothing is queued in this benchmark")

    def cancel(self, job_id: str) -> None:
        raise AssertionError(f"a healthy job was cancelled: {job_id}")

    def logs(self, job_id: str, tail: int = 200) -> str:
        return ""

    def render(self, spec: JobSpec) -> str:
        return ""

    def capacity(self) -> int | None:
        return None


def seed(db_url: str, home: Path, active: int, finished: int) -> list[Path]:
    """The runs, inserted in bulk; returns the log files of the running ones."""
    now = utcnow()
    experiment_id = uuid.uuid4()
    jobs: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    logs: list[Path] = []
    config = {"method": "selfpatch", "note": "x" * 400}  # never read by a pass; sized like a small config
    for i in range(finished + active):
        running = i >= finished
        job_id = uuid.uuid4()
        folder = home / "runs" / str(job_id)
        created = now - timedelta(seconds=finished + active - i)
        jobs.append(
            {
                "id": job_id,
                "kind": "train",
                "status": "running" if running else "succeeded",
                "launcher": "bench",
                "resources": {},
                "requeues": 0,
                "folder": str(folder),
                "mlflow_synced": True,
                "created_by": "bench",
                "created_at": created,
                "updated_at": created,
                "started_at": created,
                "ended_at": None if running else created,
                "last_heartbeat_at": now if running else created,
            }
        )
        runs.append(
            {
                "id": job_id,
                "experiment_id": experiment_id,
                "name": f"run-{i}",
                "method": "selfpatch",
                "config": config,
                "config_hash": hashlib.sha256(str(i).encode()).hexdigest(),
                "output_dir": str(folder / "train"),
                "progress": {},
                "listed_at": created,
            }
        )
        attempts.append(
            {
                "id": uuid.uuid4(),
                "job_id": job_id,
                "number": 1,
                "backend": "bench",
                "backend_job_id": f"bench-{i}",
                "host": "node-1",
                "state": "running" if running else "ended",
                "submitted_at": created,
                "started_at": created,
                "ended_at": None if running else created,
                "accelerators": 1,
            }
        )
        if running:
            (folder / "train").mkdir(parents=True)
            log = folder / "train" / "log.jsonl"
            log.write_text("".join(json.dumps({"iteration": s, "loss": 6.0}) + "\n" for s in range(0, 200, 10)))
            logs.append(log)
    db = Database(db_url)
    with db.transaction() as session:
        session.execute(
            insert(table_of(Experiment)),
            [{"id": experiment_id, "name": f"bench-{experiment_id.hex[:8]}", "eval_policy": {}, "created_at": now}],
        )
        for table, rows in ((table_of(Job), jobs), (table_of(Run), runs), (table_of(Attempt), attempts)):
            for start in range(0, len(rows), 5000):
                session.execute(insert(table), rows[start : start + 5000])
    db.dispose()
    return logs


def table_of(model: Any) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def grow(logs: list[Path], step: int, checkpoint_every: int | None = 100) -> None:
    """What the trainers did between two passes: a metrics line each, a checkpoint now and then (None: never)."""
    for i, log in enumerate(logs):
        lines = [json.dumps({"iteration": 200 + step * 10, "loss": 5.0}) + "\n"]
        if checkpoint_every is not None and i % checkpoint_every == step % checkpoint_every:
            path = log.parent / f"checkpoint{step:04d}.pth"
            payload = f"weights {step}".encode()
            path.write_bytes(payload)
            entry = {"event": "checkpoint", "path": str(path), "epoch": step, "iteration": step * 10}
            lines.append(json.dumps({**entry, "sha256": hashlib.sha256(payload).hexdigest()}) + "\n")
        with log.open("a") as handle:
            handle.writelines(lines)


def fresh_database(kind: str, tmp: Path) -> tuple[str, str | None]:
    """(url, name of a PostgreSQL database to drop afterwards)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'orch.db'}", None
    name = f"bench_reconciler_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def drop_database(name: str) -> None:
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def postgres_reachable() -> bool:
    try:
        engine = create_engine(PG_ADMIN, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def measure(kind: str, active: int, finished: int, passes: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="reconciler-bench-"))
    url, pg_name = fresh_database(kind, tmp)
    try:
        upgrade(url)
        logs = seed(url, tmp / "home", active, finished)
        settings = Settings(
            home=tmp / "home", database_url=url, admin_tokens="admin:bench-admin", heartbeat_timeout_s=3600
        )
        db = Database(url)
        scheduler = RunningScheduler()
        reconciler = Reconciler(settings, db, Launchers(settings, fixed={"bench": scheduler}))
        first = time.perf_counter()
        stats = reconciler.reconcile_once()  # the first pass after a (re)start reads every log once
        first = time.perf_counter() - first
        assert not stats.errors, stats.errors[:3]
        times = []
        for step in range(1, passes + 1):
            grow(logs, step)
            started = time.perf_counter()
            stats = reconciler.reconcile_once()
            times.append(time.perf_counter() - started)
            assert not stats.errors, stats.errors[:3]
            assert stats.jobs == active, (stats.jobs, active)
        with db.sessions() as session:
            recorded = session.execute(text("SELECT count(*) FROM checkpoints")).scalar_one()
        expected = sum(1 for step in range(1, passes + 1) for i in range(active) if i % 100 == step % 100)
        assert recorded == expected, f"{recorded} checkpoints recorded, {expected} logged"
        db.dispose()
        return {"first": first, "median": statistics.median(times), "max": max(times)}
    finally:
        if pg_name is not None:
            drop_database(pg_name)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--active", type=int, nargs="*", help="active runs per case (default 100 1000 [5000])")
    parser.add_argument("--finished", type=int, nargs="*", help="finished runs per case (default 10000 [100000])")
    parser.add_argument("--passes", type=int, default=5, help="timed passes per case (median reported)")
    parser.add_argument("--full", action="store_true", help="add 5,000 active and 100,000 finished runs")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if "postgres" in kinds and not postgres_reachable():
        print("PostgreSQL at 127.0.0.1:5432 is not reachable: SQLite only", file=sys.stderr)
        kinds.remove("postgres")
    actives = args.active or ([100, 1000, 5000] if args.full else [100, 1000])
    finisheds = args.finished or ([10_000, 100_000] if args.full else [10_000])
    cases = [(a, finisheds[0]) for a in actives] + [(actives[min(1, len(actives) - 1)], f) for f in finisheds[1:]]
    print("| database | active | finished | first pass | steady pass (median) | max | per active run | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for kind in kinds:
        baseline: dict[str, float] = {}
        for active, finished in cases:
            result = measure(kind, active, finished, args.passes)
            median = result["median"]
            if (active, finished) == cases[0]:
                baseline = result
                note = "baseline (growth)"
            elif finished == cases[0][1]:
                note = f"{median / baseline['median']:.1f}x time for {active / cases[0][0]:.0f}x active"
            else:
                ref = measure_cache.get((kind, active, cases[0][1]))
                note = f"{median / ref:.2f}x time for {finished / cases[0][1]:.0f}x finished" if ref else ""
            measure_cache[(kind, active, finished)] = median
            print(
                f"| {kind} | {active:,} | {finished:,} | {result['first'] * 1000:.0f} ms | {median * 1000:.0f} ms "
                f"| {result['max'] * 1000:.0f} ms | {median / active * 1000:.2f} ms | {note} |",
                flush=True,
            )


measure_cache: dict[tuple[str, int, int], float] = {}

if __name__ == "__main__":
    main()
