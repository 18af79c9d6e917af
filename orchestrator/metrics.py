"""Prometheus metrics of the reconciler: pass duration, jobs per kind and status, queue depths, launcher errors.

They live here, not in `api`, because the reconciler updates them and `orchestrator` never imports `api`;
the service exports them at /metrics (api/observability.py). The gauges are refreshed at the end of every
pass from one GROUP BY over the jobs table, so they are exact whatever changed the rows (REST, reports,
another process). With `PROMETHEUS_MULTIPROC_DIR` set (several service processes, see the README) the
gauges keep the most recent value any process wrote, counters and histograms add up over processes.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select

from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs.kinds import KINDS
from orchestrator.lifecycle import Status

log = logging.getLogger("orchestrator.metrics")

#: A pass takes milliseconds when nothing moves, seconds when it submits to SLURM or Ray.
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RECONCILE_PASS_SECONDS = Histogram(
    "orch_reconcile_pass_seconds", "Duration of one reconciler pass (completed passes).", buckets=PASS_BUCKETS
)
JOBS = Gauge(
    "orch_jobs",
    "Jobs per kind and lifecycle status, counted at the end of the latest reconciler pass.",
    ["kind", "status"],
    multiprocess_mode="mostrecent",
)
QUEUE_DEPTH = Gauge(
    "orch_queue_depth",
    "Queued jobs waiting for their launcher, per launcher and launcher queue (train or eval).",
    ["launcher", "queue"],
    multiprocess_mode="mostrecent",
)
LAUNCHER_ERRORS = Counter(
    "orch_launcher_errors",
    "Errors a launcher (scheduler backend) raised to the reconciler, by launcher and operation.",
    ["launcher", "operation"],
)

#: (launcher, queue) pairs seen with queued jobs, so a queue that empties reads 0 instead of its last depth.
_queues_seen: set[tuple[str, str]] = set()


def launcher_error(launcher: str, operation: str) -> None:
    """Count one LauncherError (`operation`: poll or submit)."""
    LAUNCHER_ERRORS.labels(launcher, operation).inc()


#: The job gauges count every job, finished ones included: refreshed at most this often, not every pass, so
#: a pass costs what is active, not the whole history.
GAUGE_INTERVAL_S = 15.0
_last_refresh: dict[str, float] = {}


def pass_done(db: Database, seconds: float) -> None:
    """Record a completed pass and, every GAUGE_INTERVAL_S, refresh the job gauges; a failing count is
    logged, never raised, because metrics must not stop the reconciler."""
    RECONCILE_PASS_SECONDS.observe(seconds)
    now = time.monotonic()
    if now - _last_refresh.get(db.url, -GAUGE_INTERVAL_S) < GAUGE_INTERVAL_S:
        return
    _last_refresh[db.url] = now
    try:
        refresh_job_gauges(db)
    except Exception:
        log.exception("job gauges not refreshed")


def refresh_job_gauges(db: Database) -> None:
    """Set `orch_jobs` and `orch_queue_depth` from one GROUP BY (every kind x status pair is written, zeros
    included, so a series never keeps a stale count)."""
    with db.sessions() as session:
        rows = session.execute(
            select(Job.kind, Job.status, Job.launcher, func.count()).group_by(Job.kind, Job.status, Job.launcher)
        ).all()
    jobs = {(kind, status.value): 0 for kind in KINDS for status in Status}
    queued = dict.fromkeys(_queues_seen, 0)
    for kind, status, launcher, count in rows:
        jobs[(kind, status)] = jobs.get((kind, status), 0) + count
        if status == Status.QUEUED.value and kind in KINDS:
            key = (launcher, KINDS[kind].queue)
            queued[key] = queued.get(key, 0) + count
    for (kind, status), count in jobs.items():
        JOBS.labels(kind, status).set(count)
    for (launcher, queue), count in queued.items():
        QUEUE_DEPTH.labels(launcher, queue).set(count)
    _queues_seen.update(queued)
