"""REST API load and reconciler cost, SQLite vs PostgreSQL measured in the same run.

* `POST /api/v1/runs` (dry-run launcher) and `GET /api/v1/runs` with 50 concurrent clients against a real
  `orchestrator serve` process: requests/s, p50 and p99 latency.
* One reconciler pass over 1,000 active runs whose jobs a fake scheduler holds queued or running:
  seconds per pass.

    python benchmarks/api_load.py [--requests 1000] [--clients 50] [--active 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.db.migrate import upgrade  # noqa: E402
from orchestrator.db.models import Attempt, Experiment, Run, utcnow  # noqa: E402
from orchestrator.db.session import Database  # noqa: E402
from orchestrator.jobs.fake import FakeJob, FakeLauncher  # noqa: E402
from orchestrator.jobs.kinds import job_spec  # noqa: E402
from orchestrator.launchers import Launchers  # noqa: E402
from orchestrator.launchers.base import JobState, JobStatus  # noqa: E402
from orchestrator.lifecycle import Status  # noqa: E402
from orchestrator.reconciler import Reconciler  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402

TOKEN = "bench-admin-token"
BODY = {"experiment": "bench", "preset": "tiny_cpu", "overrides": ["optim.epochs=1"], "launcher": "dryrun"}
PG_ADMIN = os.environ.get("ORCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def load(url: str, method: str, total: int, clients: int) -> tuple[float, list[float], int]:
    """`total` requests from `clients` concurrent connections; returns wall seconds, latencies, errors."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in counter:
            start = time.perf_counter()
            if method == "POST":
                response = await client.post("/api/v1/runs", json=BODY, headers=headers)
            else:
                response = await client.get("/api/v1/runs", params={"page_size": 50}, headers=headers)
            latencies.append(time.perf_counter() - start)
            errors += response.status_code >= 400

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start, latencies, errors


def serve(db_url: str, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "ORCH_HOME": str(home),
        "ORCH_DATABASE_URL": db_url,
        "ORCH_ADMIN_TOKENS": f"b:{TOKEN}",
        "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    cmd = [
        str(Path(sys.executable).parent / "orchestrator"),
        "serve",
        "--port",
        str(port),
        "--no-reconciler",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"service on {db_url} did not start")


def seed_active_runs(db_url: str, home: Path, count: int, status: Status, fake: FakeLauncher) -> None:
    """`count` runs with one attempt each, their jobs held by `fake` (queued, or running when `status` is)."""
    db = Database(db_url)
    running = status == Status.RUNNING
    with db.transaction() as session:
        experiment = Experiment(name=f"reconcile-bench-{status}", description="", eval_policy={})
        session.add(experiment)
        session.flush()
        for i in range(count):
            run_id = uuid.uuid4()
            folder = home / "runs" / str(run_id)
            run = Run(
                id=run_id,
                experiment_id=experiment.id,
                name=f"r{i}",
                method="selfpatch",
                config={},
                config_hash="0" * 64,
                launcher="local",
                resources={},
                status=status.value,
                folder=str(folder),
                output_dir=str(folder / "train"),
                progress={},
                last_heartbeat_at=utcnow(),
            )
            session.add(run)
            backend_job_id = f"bench-{status}-{i}"
            session.add(
                Attempt(
                    job_id=run_id,
                    number=1,
                    backend="local",
                    backend_job_id=backend_job_id,
                    state="running" if running else "pending",
                    started_at=utcnow() if running else None,
                )
            )
            spec = job_spec(str(run_id), "train", folder, {}, 1, sys.executable)
            state = (
                JobStatus(JobState.RUNNING, host="bench", started_at=utcnow())
                if running
                else JobStatus(JobState.PENDING)
            )
            fake.jobs[backend_job_id] = FakeJob(spec, state)
    db.dispose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def bench_backend(name: str, db_url: str, args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        upgrade(db_url)
        proc, url = serve(db_url, home)
        try:
            asyncio.run(load(url, "POST", 20, 5))  # warm-up (imports, first connections)
            for method, total in (("POST", args.requests), ("GET", args.requests)):
                seconds, latencies, errors = asyncio.run(load(url, method, total, args.clients))
                rows.append(
                    {
                        "backend": name,
                        "what": f"{method} /runs",
                        "rps": total / seconds,
                        "p50_ms": 1000 * statistics.median(latencies),
                        "p99_ms": 1000 * percentile(latencies, 0.99),
                        "errors": errors,
                    }
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def bench_reconciler(name: str, db_url: str, args: argparse.Namespace, status: Status) -> dict[str, object]:
    """One reconciler pass over `args.active` active runs: jobs still queued (steady state, nothing can
    change) or all running (each run is locked, checked for heartbeats and new checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        upgrade(db_url)
        fake = FakeLauncher()
        seed_active_runs(db_url, home, args.active, status, fake)
        settings = Settings(home=home, database_url=db_url, mlflow_tracking_uri=f"sqlite:///{home / 'm.db'}")
        db = Database(db_url)
        reconciler = Reconciler(settings, db, Launchers(settings, fixed={"local": fake}))
        passes = []
        for _ in range(3):
            stats = reconciler.reconcile_once()
            passes.append(stats.seconds)
        db.dispose()
    what = f"reconcile pass, {stats.jobs} {'running' if status == Status.RUNNING else 'queued-job'} runs"
    return {"backend": name, "what": what, "seconds": min(passes), "errors": len(stats.errors)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--active", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_backend("sqlite", f"sqlite:///{tmp}/bench.db", args)
        rows.append(bench_reconciler("sqlite", f"sqlite:///{tmp}/reconcile.db", args, Status.SUBMITTED))
        rows.append(bench_reconciler("sqlite", f"sqlite:///{tmp}/reconcile2.db", args, Status.RUNNING))
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    for purpose in ("load", "reconcile", "reconcile-running"):
        name = f"orch_bench_{purpose.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
            if purpose == "load":
                rows += bench_backend("postgresql", url, args)
            else:
                status = Status.RUNNING if purpose == "reconcile-running" else Status.SUBMITTED
                rows.append(bench_reconciler("postgresql", url, args, status))
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print(
        f"{args.clients} concurrent clients, {args.requests} requests per row, one uvicorn worker, "
        f"{os.cpu_count()} CPU cores shared by client and server"
    )
    print(f"{'backend':11s} {'what':40s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'s/pass':>8s} {'errors':>6s}")
    for row in rows:
        rps = f"{row['rps']:.0f}" if "rps" in row else "-"
        p50 = f"{row['p50_ms']:.0f}" if "p50_ms" in row else "-"
        p99 = f"{row['p99_ms']:.0f}" if "p99_ms" in row else "-"
        sec = f"{row['seconds']:.3f}" if "seconds" in row else "-"
        print(f"{row['backend']:11s} {row['what']:40s} {rps:>8s} {p50:>8s} {p99:>8s} {sec:>8s} {row['errors']:>6}")
    print()
    for what in ("POST /runs", "GET /runs"):
        sq = next(r for r in rows if r["backend"] == "sqlite" and r["what"] == what)
        pg = next(r for r in rows if r["backend"] == "postgresql" and r["what"] == what)
        print(f"{what}: PostgreSQL/SQLite throughput ratio {float(pg['rps']) / float(sq['rps']):.2f}x")  # type: ignore[arg-type]
    for kind in ("queued-job", "running"):
        sq_pass = next(r for r in rows if r["backend"] == "sqlite" and kind in str(r["what"]))
        pg_pass = next(r for r in rows if r["backend"] == "postgresql" and kind in str(r["what"]))
        ratio = float(pg_pass["seconds"]) / float(sq_pass["seconds"])  # type: ignore[arg-type]
        print(f"reconcile pass ({kind} runs): PostgreSQL/SQLite time ratio {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
