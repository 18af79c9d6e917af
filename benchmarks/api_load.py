"""REST API load, SQLite vs PostgreSQL measured in the same run (the reconciler's cost at scale is
`benchmarks/reconciler_scale.py`).

* `POST /api/v1/runs` (dry-run launcher) and `GET /api/v1/runs` with 50 concurrent clients against a real
  `orchestrator serve` process: requests/s, p50 and p99 latency.
* The same requests open loop: arrivals at a fixed rate (`--rate`, default 100/s for `--duration` s), latency
  counted from each request's scheduled arrival, so queueing shows in the tail.
* MLflow's own `runs/create` on PostgreSQL (its server, one worker): the baseline. Not on SQLite: MLflow's
  server there stalled for minutes under 50 concurrent creates.

    python benchmarks/api_load.py [--requests 1000] [--clients 50] [--rate 100] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.db.migrate import upgrade  # noqa: E402

TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"experiment": "bench", "preset": "tiny_cpu", "overrides": ["optim.epochs=1"], "launcher": "dryrun"}
PG_ADMIN = os.environ.get("ORCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The requests of each row, encoded once: (method, path, body, headers).
REQUESTS: dict[str, tuple[str, str, bytes | None, dict[str, str]]] = {
    "POST": ("POST", "/api/v1/runs", json.dumps(BODY).encode(), {**AUTH, "Content-Type": "application/json"}),
    "GET": ("GET", "/api/v1/runs?page_size=50", None, AUTH),
    "MLFLOW": ("POST", "/api/2.0/mlflow/runs/create", b'{"experiment_id": "0"}', {"Content-Type": "application/json"}),
}
Send = Callable[[str], Awaitable[int]]


@asynccontextmanager
async def http_client(kind: str, url: str, connections: int) -> AsyncIterator[Send]:
    """The load generator: `send(row)` makes one request of that row and returns its status. aiohttp by default:
    its CPU per request is a fraction of httpx's, and client, servers and database share the cores here, so
    a heavier client would bound every server's throughput alike. `--client httpx` compares with older tables."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=min(connections, 100))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def send_httpx(row: str) -> int:
                method, path, body, headers = REQUESTS[row]
                return (await client.request(method, path, content=body, headers=headers)).status_code

            yield send_httpx
        return
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def send_aiohttp(row: str) -> int:
            method, path, body, headers = REQUESTS[row]
            async with session.request(method, path, data=body, headers=headers) as response:
                await response.read()
                return response.status

        yield send_aiohttp


async def load(client: str, url: str, row: str, total: int, clients: int) -> tuple[float, list[float], int]:
    """`total` requests from `clients` concurrent connections; returns wall seconds, latencies, errors."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def client_loop(send: Send) -> None:
        nonlocal errors
        for _ in counter:
            start = time.perf_counter()
            status = await send(row)
            latencies.append(time.perf_counter() - start)
            errors += status >= 400

    async with http_client(client, url, clients) as send:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(send) for _ in range(clients)))
        return time.perf_counter() - start, latencies, errors


async def open_loop(client: str, url: str, row: str, rate: float, duration: float) -> tuple[float, list[float], int]:
    """Arrivals at a fixed rate whatever the server does (no coordinated omission): each request's latency
    counts from its scheduled arrival, so a server that falls behind shows its queue in the tail."""
    latencies: list[float] = []
    errors = 0
    total = int(rate * duration)

    async def one(send: Send, due: float) -> None:
        nonlocal errors
        try:
            errors += await send(row) >= 400
        except (httpx.HTTPError, aiohttp.ClientError, TimeoutError):
            errors += 1
        latencies.append(time.perf_counter() - due)

    async with http_client(client, url, 400) as send:
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(send, due)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - start, latencies, errors


def mlflow_server(db_url: str, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    """MLflow's tracking server on the same kind of database, one worker: the baseline for POST /runs."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        db_url,
        "--artifacts-destination",
        str(home / "artifacts"),
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, started(proc, f"http://127.0.0.1:{port}", "/health", 120, f"MLflow server on {db_url}")


def started(proc: subprocess.Popen[bytes], url: str, probe: str, seconds: float, what: str) -> str:
    """The server's URL once `probe` answers 200; killed and reported if it never does."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}{probe}", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: a server still draining an overload must not hang the benchmark."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


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
    return proc, started(proc, f"http://127.0.0.1:{port}", "/readyz", 60, f"service on {db_url}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (Linux /proc): the server's cost per request,
    which, unlike latency, does not depend on what else shares the cores."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return total


def measured(pid: int, run: Any) -> tuple[float, list[float], int, float]:
    """(seconds, latencies, errors) of a load run, and the server's CPU seconds during it."""
    before = cpu_seconds(pid)
    seconds, latencies, errors = asyncio.run(run)
    return seconds, latencies, errors, cpu_seconds(pid) - before


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def bench_backend(name: str, db_url: str, args: argparse.Namespace, mlflow_db: str | None) -> list[dict[str, object]]:
    """Our service, closed and open loop; then MLflow's server on `mlflow_db` (same kind of database)."""
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        upgrade(db_url)
        proc, url = serve(db_url, home)
        try:
            asyncio.run(load(args.client, url, "POST", 20, 5))  # warm-up (imports, first connections)
            for method, total in (("POST", args.requests), ("GET", args.requests)):
                seconds, latencies, errors, cpu = measured(
                    proc.pid, load(args.client, url, method, total, args.clients)
                )
                rows.append(row(name, f"{method} /runs", total / seconds, latencies, errors, cpu / total))
            for method in ("POST", "GET"):
                seconds, latencies, errors, cpu = measured(
                    proc.pid, open_loop(args.client, url, method, args.rate, args.duration)
                )
                what = f"{method} /runs open loop {args.rate:.0f}/s"
                rows.append(row(name, what, len(latencies) / seconds, latencies, errors, cpu / len(latencies)))
        finally:
            stop(proc)
        if mlflow_db is not None:
            proc, url = mlflow_server(mlflow_db, home)
            try:
                asyncio.run(load(args.client, url, "MLFLOW", 20, 5))
                seconds, latencies, errors, cpu = measured(
                    proc.pid, load(args.client, url, "MLFLOW", args.requests, args.clients)
                )
                rows.append(
                    row(name, "MLflow runs/create", args.requests / seconds, latencies, errors, cpu / args.requests)
                )
                seconds, latencies, errors, cpu = measured(
                    proc.pid, open_loop(args.client, url, "MLFLOW", args.rate, args.duration)
                )
                what = f"MLflow runs/create open loop {args.rate:.0f}/s"
                rows.append(row(name, what, len(latencies) / seconds, latencies, errors, cpu / len(latencies)))
            finally:
                stop(proc)
    return rows


def row(backend: str, what: str, rps: float, latencies: list[float], errors: int, cpu: float) -> dict[str, object]:
    return {
        "backend": backend,
        "what": what,
        "rps": rps,
        "cpu_ms": 1000 * cpu,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=100.0, help="Open loop: arrivals per second.")
    parser.add_argument("--duration", type=float, default=10.0, help="Open loop: seconds of arrivals.")
    parser.add_argument(
        "--client", choices=("aiohttp", "httpx"), default="aiohttp", help="The load generator's HTTP client."
    )
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure MLflow's runs/create on the same kind of database.",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # no MLflow row on SQLite: its server (one worker) stalled for minutes under 50 concurrent creates here
        rows += bench_backend("sqlite", f"sqlite:///{tmp}/bench.db", args, None)
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def fresh(purpose: str) -> str:
        name = f"orch_bench_{purpose}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"

    try:
        rows += bench_backend("postgresql", fresh("load"), args, fresh("mlflow") if args.mlflow else None)
    finally:
        with admin.connect() as conn:
            for name in created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print(
        f"{args.clients} concurrent clients, {args.requests} requests per row, one uvicorn worker, "
        f"{os.cpu_count()} CPU cores shared by client and server, client: {args.client}"
    )
    print("| backend | what | req/s | p50 ms | p99 ms | server CPU ms/req | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['what']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['cpu_ms']:.2f} | {r['errors']} |"
        )
    print()
    for backend in ("sqlite", "postgresql"):
        ours = next(r for r in rows if r["backend"] == backend and r["what"] == "POST /runs")
        theirs = next((r for r in rows if r["backend"] == backend and r["what"] == "MLflow runs/create"), None)
        if theirs is not None:
            ratio = float(ours["rps"]) / float(theirs["rps"])  # type: ignore[arg-type]
            cpu = float(theirs["cpu_ms"]) / float(ours["cpu_ms"])  # type: ignore[arg-type]
            print(f"{backend}: POST /runs vs MLflow runs/create: throughput {ratio:.2f}x, server CPU {cpu:.2f}x less")
    for what in ("POST /runs", "GET /runs"):
        sq = next(r for r in rows if r["backend"] == "sqlite" and r["what"] == what)
        pg = next(r for r in rows if r["backend"] == "postgresql" and r["what"] == what)
        print(f"{what}: PostgreSQL/SQLite throughput ratio {float(pg['rps']) / float(sq['rps']):.2f}x")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
