"""one job layer: runs and evaluations become kinds of job (jobs table), attempts and events per job

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

The lifecycle columns of `runs` and `evaluations` move into `jobs` (joined-table inheritance); attempts and
events point at the job; evaluations get attempt rows (synthesised from their old attempt counter), a
`live` flag (their dedup key is unique only among evaluations that did not fail or get cancelled) and
`retry_of_id`. The tables are rebuilt under new names, filled with INSERT ... SELECT, and swapped in, so
the same steps run on SQLite and PostgreSQL and no row is lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
JOB_COLUMNS = (
    "id, kind, status, status_reason, launcher, resources, requeues, folder, mlflow_run_id, mlflow_synced, "
    "created_by, created_at, updated_at, started_at, ended_at, last_heartbeat_at"
)
TERMINAL = ("succeeded", "failed", "cancelled")


def _create_new_tables() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("launcher", sa.String(32), nullable=False),
        sa.Column("resources", sa.JSON(), nullable=False),
        sa.Column("requeues", sa.Integer(), nullable=False),
        sa.Column("folder", sa.Text(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_synced", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("ended_at", TZ, nullable=True),
        sa.Column("last_heartbeat_at", TZ, nullable=True),
    )
    op.create_table(
        "runs_v3",
        sa.Column("id", sa.Uuid(), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("experiment_id", sa.Uuid(), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("retry_of_id", sa.Uuid(), sa.ForeignKey("runs_v3.id"), nullable=True),
        sa.Column("sweep_id", sa.Uuid(), nullable=True),
        sa.Column("output_dir", sa.Text(), nullable=False),
        sa.Column("mlflow_experiment_id", sa.String(64), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
    )
    op.create_table(
        "checkpoints_v3",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("run_id", sa.Uuid(), sa.ForeignKey("runs_v3.id"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("run_id", "path", "sha256", name="uq_checkpoints_run_path_sha"),
    )
    op.create_table(
        "evaluations_v3",
        sa.Column("id", sa.Uuid(), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("dedup_key", sa.String(64), nullable=False),
        sa.Column("live", sa.Boolean(), nullable=False),
        sa.Column("run_id", sa.Uuid(), sa.ForeignKey("runs_v3.id"), nullable=False),
        sa.Column("checkpoint_id", sa.Uuid(), sa.ForeignKey("checkpoints_v3.id"), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("benchmark", sa.String(32), nullable=False),
        sa.Column("benchmark_version", sa.String(16), nullable=False),
        sa.Column("config_name", sa.String(100), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_of_id", sa.Uuid(), sa.ForeignKey("evaluations_v3.id"), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
    )
    op.create_table(
        "attempts_v3",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("backend_job_id", sa.String(128), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("submitted_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("ended_at", TZ, nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("exit_reason", sa.Text(), nullable=True),
        sa.Column("accelerators", sa.Integer(), nullable=False),
        sa.Column("accelerator_seconds", sa.Float(), nullable=True),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
    )
    op.create_table(
        "events_v3",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("at", TZ, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
    )


def _copy_rows(bind: sa.engine.Connection) -> None:
    false = sa.false().compile(dialect=bind.dialect)
    true = sa.true().compile(dialect=bind.dialect)
    run_folder = "substr(output_dir, 1, length(output_dir) - length('/train'))"
    op.execute(
        f"INSERT INTO jobs ({JOB_COLUMNS}) SELECT id, 'train', status, status_reason, launcher, resources, "
        f"requeues, {run_folder}, mlflow_run_id, {false}, created_by, created_at, updated_at, started_at, "
        "ended_at, last_heartbeat_at FROM runs"
    )
    op.execute(
        "INSERT INTO runs_v3 (id, experiment_id, name, method, config, config_hash, retry_of_id, sweep_id, "
        "output_dir, mlflow_experiment_id, progress) SELECT id, experiment_id, name, method, config, config_hash, "
        "retry_of_id, sweep_id, output_dir, mlflow_experiment_id, progress FROM runs"
    )
    op.execute(
        "INSERT INTO checkpoints_v3 (id, run_id, attempt, path, epoch, step, sha256, kind, created_at) "
        "SELECT id, run_id, attempt, path, epoch, step, sha256, kind, created_at FROM checkpoints"
    )
    # evaluation statuses were bare strings; 'submitting' was a submission in flight
    status = (
        "CASE WHEN e.status = 'submitting' AND e.backend_job_id IS NOT NULL THEN 'submitted' "
        "WHEN e.status = 'submitting' THEN 'queued' ELSE e.status END"
    )
    op.execute(
        f"INSERT INTO jobs ({JOB_COLUMNS}) SELECT e.id, 'evaluate', {status}, e.error, e.launcher, e.resources, 0, "
        f"'', e.mlflow_run_id, {false}, 'policy', e.created_at, e.created_at, e.started_at, e.ended_at, NULL "
        "FROM evaluations e"
    )
    live = f"CASE WHEN status IN ('failed', 'cancelled') THEN {false} ELSE {true} END"
    op.execute(
        "INSERT INTO evaluations_v3 (id, dedup_key, live, run_id, checkpoint_id, checkpoint_sha256, benchmark, "
        "benchmark_version, config_name, config, config_hash, dataset, trigger, max_attempts, retry_of_id, metrics, "
        f"seconds) SELECT id, dedup_key, {live}, run_id, checkpoint_id, checkpoint_sha256, benchmark, "
        "benchmark_version, config_name, config, config_hash, dataset, trigger, max_attempts, NULL, metrics, "
        "seconds FROM evaluations"
    )
    op.execute(
        "INSERT INTO attempts_v3 (id, job_id, number, backend, backend_job_id, host, state, submitted_at, started_at, "
        "ended_at, exit_code, exit_reason, accelerators, accelerator_seconds, log_path) SELECT id, run_id, number, "
        "backend, backend_job_id, host, state, submitted_at, started_at, ended_at, exit_code, exit_reason, "
        "accelerators, accelerator_seconds, log_path FROM attempts"
    )
    op.execute(
        "INSERT INTO events_v3 (id, job_id, at, kind, from_status, to_status, actor, reason, data) "
        "SELECT id, run_id, at, kind, from_status, to_status, actor, reason, data FROM events"
    )
    _evaluation_folders_and_attempts(bind)


def _evaluation_folders_and_attempts(bind: sa.engine.Connection) -> None:
    """Each evaluation's folder (<run folder>/evals/<id>) and one attempt row per attempt it counted."""
    jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("folder", sa.Text()))
    attempts = sa.table(
        "attempts_v3",
        sa.column("id", sa.Uuid()),
        sa.column("job_id", sa.Uuid()),
        *(sa.column(name) for name in ("number", "backend", "backend_job_id", "state")),
        sa.column("submitted_at", TZ),
        sa.column("started_at", TZ),
        sa.column("ended_at", TZ),
        sa.column("exit_reason", sa.Text()),
        sa.column("accelerators", sa.Integer()),
    )
    old = sa.table(
        "evaluations",
        *(sa.column(name) for name in ("launcher", "status", "attempts", "backend_job_id", "error")),
        sa.column("id", sa.Uuid()),
        sa.column("run_id", sa.Uuid()),
        sa.column("created_at", TZ),
        sa.column("started_at", TZ),
        sa.column("ended_at", TZ),
    )
    runs = sa.table("runs", sa.column("id", sa.Uuid()), sa.column("output_dir", sa.Text()))
    rows = bind.execute(sa.select(old, runs.c.output_dir).join(runs, runs.c.id == old.c.run_id)).mappings().all()
    for row in rows:
        folder = str(PurePosixPath(row["output_dir"]).parent / "evals" / str(row["id"]))
        bind.execute(sa.update(jobs).where(jobs.c.id == row["id"]).values(folder=folder))
        count = int(row["attempts"] or 0)
        for number in range(1, count + 1):
            last = number == count
            active = last and row["status"] not in TERMINAL and row["status"] != "queued"
            bind.execute(
                sa.insert(attempts).values(
                    id=uuid.uuid4(),
                    job_id=row["id"],
                    number=number,
                    backend=row["launcher"],
                    backend_job_id=row["backend_job_id"] if last else None,
                    state="pending" if active else "ended",
                    submitted_at=row["created_at"],
                    started_at=row["started_at"] if last else None,
                    ended_at=None if active else (row["ended_at"] or row["created_at"]),
                    exit_reason=None
                    if active
                    else (row["error"] if last else "attempt recorded before migration 0003"),
                    accelerators=0,
                )
            )


def upgrade() -> None:
    bind = op.get_bind()
    _create_new_tables()
    _copy_rows(bind)
    for table in ("evaluations", "events", "attempts", "checkpoints", "runs"):  # children first
        op.drop_table(table)
    for table in ("runs", "checkpoints", "evaluations", "attempts", "events"):
        op.rename_table(f"{table}_v3", table)
    if bind.dialect.name == "postgresql":
        # keep the serial of events counting after the copied ids, and give the keys their final names
        op.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM events")
        for table in ("runs", "checkpoints", "evaluations", "attempts", "events"):
            op.execute(f"ALTER INDEX {table}_v3_pkey RENAME TO {table}_pkey")
    op.create_index("ix_jobs_kind_created", "jobs", ["kind", "created_at", "id"])
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_runs_experiment", "runs", ["experiment_id"])
    op.create_index("ix_runs_config_hash", "runs", ["config_hash"])
    op.create_index("ix_checkpoints_run_id", "checkpoints", ["run_id"])
    op.create_index("ix_checkpoints_sha256", "checkpoints", ["sha256"])
    op.create_index("ix_attempts_job_id", "attempts", ["job_id"])
    op.create_index("ix_events_job", "events", ["job_id", "id"])
    op.create_index("ix_evaluations_run_id", "evaluations", ["run_id"])
    op.create_index("ix_evaluations_checkpoint_id", "evaluations", ["checkpoint_id"])
    op.create_index("ix_evaluations_checkpoint_sha256", "evaluations", ["checkpoint_sha256"])
    op.create_index(
        "ux_evaluations_live_key",
        "evaluations",
        ["dedup_key"],
        unique=True,
        sqlite_where=sa.text("live"),
        postgresql_where=sa.text("live"),
    )


def downgrade() -> None:
    raise NotImplementedError("0003 moves data between tables; restore a backup taken before the upgrade instead")
