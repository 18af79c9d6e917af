"""GET /runs with many runs recorded, SQLite and PostgreSQL in the same run: the first page, a deep page (a
cursor 90 % of the way down), and first pages filtered by status and by experiment, each from `--clients`
concurrent clients (closed loop) against a real `orchestrator serve` process. The target: p99 < 50 ms at 10
clients with 100,000 runs. The plans behind it are checked in tests/test_list_scale.py.

    python benchmarks/list_scale.py [--runs 100000] [--requests 1000] [--clients 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

import api_load  # noqa: E402
import reconciler_scale  # noqa: E402

from orchestrator.db.migrate import upgrade  # noqa: E402
from orchestrator.pages import encode_cursor  # noqa: E402

TARGET_P99_MS = 50.0


def seed(db_url: str, home: Path, count: int) -> dict[str, str]:
    """`count` finished runs with an attempt each, one in ten failed and one in ten in a second experiment;
    returns the query string of each measured list."""
    reconciler_scale.seed(db_url, home, 0, count)
    engine = sa.create_engine(db_url)
    experiment = uuid.uuid4()
    # a plain text() query binds the UUID as SQLAlchemy stores it: 32 hex digits on SQLite
    second: uuid.UUID | str = experiment.hex if db_url.startswith("sqlite") else experiment
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO experiments (id, name, description, eval_policy, created_at) VALUES "
                "(:id, 'second', '', '{}', CURRENT_TIMESTAMP)"
            ),
            {"id": second},
        )
        connection.execute(
            sa.text("UPDATE runs SET experiment_id = :id WHERE name LIKE '%7'"),
            {"id": second},
        )
        connection.execute(
            sa.text("UPDATE jobs SET status = 'failed' WHERE id IN (SELECT id FROM runs WHERE name LIKE '%3')")
        )
        created_at, ident = connection.execute(
            sa.text("SELECT created_at, id FROM jobs ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET :deep"),
            {"deep": int(count * 0.9)},
        ).one()
    if db_url.startswith("postgresql"):  # what autovacuum does after a bulk load: plans from real statistics
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    engine.dispose()
    if isinstance(created_at, str):  # SQLite returns its text form through a plain text() query
        created_at = datetime.fromisoformat(created_at).replace(tzinfo=UTC)
    if not isinstance(ident, uuid.UUID):
        ident = uuid.UUID(str(ident))
    token = encode_cursor(created_at, ident)
    return {
        "first page": "page_size=50",
        "deep page (90 %)": f"page_size=50&page_token={token}",
        "status=failed": "page_size=50&status=failed",
        "experiment=second": "page_size=50&experiment=second",
    }


def postmaster() -> int | None:
    """The local PostgreSQL server's first process (its backends are its children), if it runs on this host."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "postgres":
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if (Path("/proc") / str(parent) / "comm").read_text().strip() != "postgres":
                    return int(proc.name)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return None


def bench(name: str, db_url: str, args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    home = Path(tempfile.mkdtemp(prefix="list-scale-"))
    try:
        upgrade(db_url)
        lists = seed(db_url, home, args.runs)
        proc, url = api_load.serve(db_url, home)
        try:
            database = postmaster() if name == "postgresql" else None  # SQLite runs inside the server
            for what, query in lists.items():
                api_load.REQUESTS[what] = ("GET", f"/api/v1/runs?{query}", None, api_load.AUTH)
                asyncio.run(api_load.load("aiohttp", url, what, 50, args.clients))  # warm-up
                client_before = time.process_time()
                db_before = api_load.cpu_seconds(database) if database else 0.0
                seconds, latencies, errors, cpu = api_load.measured(
                    proc.pid, api_load.load("aiohttp", url, what, args.requests, args.clients)
                )
                client = time.process_time() - client_before
                db_cpu = api_load.cpu_seconds(database) - db_before if database else 0.0
                row = api_load.row(name, what, args.requests / seconds, latencies, errors, cpu / args.requests)
                row["client_cpu_ms"] = client / args.requests * 1000
                row["db_cpu_ms"] = db_cpu / args.requests * 1000
                rows.append(row)
        finally:
            api_load.stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000, help="Runs recorded before measuring.")
    parser.add_argument("--requests", type=int, default=1000, help="Requests per row.")
    parser.add_argument("--clients", type=int, default=10, help="Concurrent clients (closed loop).")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench("sqlite", f"sqlite:///{tmp}/lists.db", args)
    url, database = reconciler_scale.fresh_database("postgresql", Path(tempfile.gettempdir()))
    try:
        rows += bench("postgresql", url, args)
    finally:
        if database is not None:
            reconciler_scale.drop_database(database)
    print(
        f"{args.runs:,} runs recorded, {args.clients} concurrent clients, {args.requests} requests per row, one "
        f"uvicorn worker, {os.cpu_count()} CPU cores shared by client, server and database"
    )
    print(
        "| backend | list | req/s | p50 ms | p99 ms | CPU ms/req: server | database | client | "
        "closed-loop floor ms | errors | p99 < 50 ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    cores = os.cpu_count() or 1
    for r in rows:
        met = "yes" if float(r["p99_ms"]) < TARGET_P99_MS else "no"  # type: ignore[arg-type]
        # every request needs this much CPU of the shared cores: with `clients` always waiting, the mean latency
        # cannot be below clients x CPU per request / cores, however well the server is written
        floor = args.clients * (float(r["cpu_ms"]) + float(r["db_cpu_ms"]) + float(r["client_cpu_ms"])) / cores  # type: ignore[arg-type]
        db = "in server" if r["backend"] == "sqlite" else f"{r['db_cpu_ms']:.2f}"
        print(
            f"| {r['backend']} | {r['what']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['cpu_ms']:.2f} | {db} | {r['client_cpu_ms']:.2f} | {floor:.1f} | {r['errors']} | {met} |"
        )
    for backend in ("sqlite", "postgresql"):
        mine = [r for r in rows if r["backend"] == backend]
        first = next(float(r["p99_ms"]) for r in mine if r["what"] == "first page")  # type: ignore[arg-type]
        worst = max(float(r["p99_ms"]) for r in mine)  # type: ignore[arg-type]
        print(f"{backend}: worst p99 {worst:.1f} ms, {worst / first:.2f}x the first page's")
    print(f"median server CPU per page: {statistics.median(float(r['cpu_ms']) for r in rows):.2f} ms")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
