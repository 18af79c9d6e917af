"""The SQL records: experiments, jobs (runs, evaluations), attempts, checkpoints, events, idempotency keys.

The database is the source of truth; schedulers and MLflow are reconciled against it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    event,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is UTC:
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime, uuid.UUID: Uuid}


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    # which benchmarks run on which checkpoints; opaque to the job lifecycle
    eval_policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="experiment")


class Job(Base):
    """What the reconciler drives, whatever its kind: lifecycle status, launcher, attempts, heartbeat.

    Each kind adds its own table joined on the id (a pretraining `Run`, an `Evaluation`), so one query
    finds every active job and one code path launches, follows and settles them all.
    """

    __tablename__ = "jobs"
    __table_args__: tuple[Any, ...] = (
        Index("ix_jobs_kind_created", "kind", "created_at", "id"),
        Index("ix_jobs_created", "created_at", "id"),  # lists of runs (train and trial kinds) newest first
        # lists filtered by status newest first, and the reconciler's active statuses (the leading column)
        Index("ix_jobs_status_created", "status", "created_at", "id"),
        # terminal jobs whose status MLflow has not been told yet: a pass looks only at those
        Index(
            "ix_jobs_unsynced",
            "status",
            postgresql_where=text("NOT mlflow_synced"),
            sqlite_where=text("mlflow_synced = 0"),  # as SQLAlchemy writes NOT on SQLite, so the planner matches it
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text)
    launcher: Mapped[str] = mapped_column(String(32))
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    requeues: Mapped[int] = mapped_column(Integer, default=0)
    #: the job's own folder: job.json, result-<attempt>.json, logs/
    folder: Mapped[str] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    #: the terminal status has been mirrored to MLflow (MLflow is the view, SQL the truth)
    mlflow_synced: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    last_heartbeat_at: Mapped[datetime | None] = mapped_column()

    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="job", order_by="Attempt.number", cascade="all, delete-orphan"
    )

    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_abstract": True}  # noqa: RUF012 (read once by the mapper)


class Run(Job):
    """A pretraining run."""

    __tablename__ = "runs"
    # a page of one experiment or sweep walks its index newest first (an index cannot span jobs and runs)
    __table_args__ = (
        Index("ix_runs_experiment_listed", "experiment_id", "listed_at", "id"),
        Index("ix_runs_sweep_listed", "sweep_id", "listed_at", "id"),
    )
    __mapper_args__ = {"polymorphic_identity": "train", "polymorphic_load": "inline"}  # noqa: RUF012 (read once by the mapper)

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    experiment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("experiments.id"))
    name: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column()
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    retry_of_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id"))
    sweep_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("sweeps.id"))
    arm: Mapped[str | None] = mapped_column(String(100))  # trials of a sweep: the arm and the paired seed
    seed: Mapped[int | None] = mapped_column(Integer)
    output_dir: Mapped[str] = mapped_column(Text)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: the job's created_at (it never changes), copied here so the run indexes can order by it
    listed_at: Mapped[datetime] = mapped_column()

    experiment: Mapped[Experiment] = relationship(back_populates="runs")
    checkpoints: Mapped[list[Checkpoint]] = relationship(
        back_populates="run", order_by="Checkpoint.step", cascade="all, delete-orphan"
    )

    @property
    def experiment_name(self) -> str:
        """As a list item (`orchestrator.runs.RunListItem`) names it: pages read both alike."""
        return self.experiment.name


class Trial(Run):
    """A run of a sweep: one (arm, seed). Same table and job runner as any run; its kind adds the sweep's
    concurrency cap and budget at launch and its MLflow run is a child of the sweep's."""

    __mapper_args__ = {"polymorphic_identity": "trial"}  # noqa: RUF012 (read once by the mapper)


@event.listens_for(Run, "before_insert", propagate=True)
def _copy_listed_at(_mapper: Any, _connection: Any, run: Run) -> None:
    """Runs the ORM inserts get the same list key as submissions, which write both columns themselves."""
    created: datetime | None = run.created_at  # unset until the job's column default runs, unless given
    run.created_at = run.listed_at = created or utcnow()


class Search(Job):
    """The driver of a search sweep: a Ray Tune experiment run as one job (restored from its folder when
    the job is retried). Its trials are `Trial` runs it registers, each started by its Tune trainable."""

    __tablename__ = "searches"
    __mapper_args__ = {"polymorphic_identity": "search", "polymorphic_load": "inline"}  # noqa: RUF012 (read once by the mapper)

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    sweep_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sweeps.id"), index=True)


class Sweep(Base):
    """An ablation (arms x seeds of one base config) or a search (trials a Ray Tune search samples),
    identified by name and the hash of its science."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_created", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec_hash: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column()
    experiment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("experiments.id"))
    status: Mapped[str] = mapped_column(String(16))  # active, completed, cancelled
    status_reason: Mapped[str | None] = mapped_column(Text)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    report_logged: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()

    experiment: Mapped[Experiment] = relationship()
    arms: Mapped[list[SweepArm]] = relationship(order_by="SweepArm.position", cascade="all, delete-orphan")


class SweepArm(Base):
    __tablename__ = "sweep_arms"
    __table_args__ = (UniqueConstraint("sweep_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    sweep_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sweeps.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    position: Mapped[int] = mapped_column(Integer)
    overrides: Mapped[dict[str, Any]] = mapped_column()  # {"overrides": [...]} (JSON object on every backend)


class SweepEvent(Base):
    """Append-only log of a sweep: created, extended, trials retried, budget spent, cancelled, completed."""

    __tablename__ = "sweep_events"
    __table_args__ = (Index("ix_sweep_events_sweep", "sweep_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    sweep_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sweeps.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Attempt(Base):
    """One submission of a job to a scheduler; a requeue or retry is a new attempt."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "number"),
        Index("ix_attempts_state", "state", "job_id"),  # the reconciler's open attempts, whatever the history
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(32))
    backend_job_id: Mapped[str | None] = mapped_column(String(128))
    host: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # submitting, pending, running, ended
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    exit_code: Mapped[int | None] = mapped_column(Integer)
    exit_reason: Mapped[str | None] = mapped_column(Text)
    accelerators: Mapped[int] = mapped_column(Integer, default=0)
    accelerator_seconds: Mapped[float | None] = mapped_column(Float)
    log_path: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="attempts")


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "path", "sha256"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship(back_populates="checkpoints")


class Event(Base):
    """Append-only log of everything that happened to a job: transitions, attempts, checkpoints."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Evaluation(Job):
    """One benchmark on one checkpoint. Among evaluations that did not fail or get cancelled, `dedup_key`
    (checkpoint sha256, benchmark, version, config hash, dataset) is unique: the same evaluation is never
    computed twice, whoever asks for it, while a failed one can be asked for (or retried) again."""

    __tablename__ = "evaluations"
    __table_args__ = (
        Index(
            "ux_evaluations_live_key",
            "dedup_key",
            unique=True,
            sqlite_where=text("live"),
            postgresql_where=text("live"),
        ),
    )
    __mapper_args__ = {"polymorphic_identity": "evaluate", "polymorphic_load": "inline"}  # noqa: RUF012 (read once by the mapper)

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    dedup_key: Mapped[str] = mapped_column(String(64))
    #: true until the evaluation fails or is cancelled (then its key is free again)
    live: Mapped[bool] = mapped_column(Boolean, default=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id"), index=True)
    checkpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), index=True)
    benchmark: Mapped[str] = mapped_column(String(32))
    benchmark_version: Mapped[str] = mapped_column(String(16))
    config_name: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column()
    config_hash: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(String(32))  # policy:every_n, policy:final, manual, retry
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    retry_of_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("evaluations.id"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seconds: Mapped[float | None] = mapped_column(Float)

    checkpoint: Mapped[Checkpoint] = relationship()
    run: Mapped[Run] = relationship(foreign_keys=[run_id])


class IdempotencyRecord(Base):
    """The reply to a creating POST, replayed when the same Idempotency-Key comes again."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)  # principal + method + path + client key
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
