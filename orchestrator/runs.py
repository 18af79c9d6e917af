"""Pretraining runs: a kind of job. Submit, list, retry; checkpoints; and the service side of their jobs.

Every function takes the caller's SQLAlchemy session: the caller owns the transaction, so a request's
writes (run, event, idempotency record) commit together or not at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Select, Table, bindparam, insert, select
from sqlalchemy.orm import Session

from orchestrator.db.models import Base, Checkpoint, Event, Job, Run, utcnow
from orchestrator.errors import ConflictError, InvalidInputError
from orchestrator.evaluations import plan_final, plan_for_checkpoint
from orchestrator.experiments import get_experiment_id
from orchestrator.jobs.files import JobFile, JobFileError, JobResult, confined
from orchestrator.jobs.kinds import Context, KindDefaults
from orchestrator.jobs.records import EVENTS, event_row, get_job, record_event
from orchestrator.jobs.train import TRAIN_DIR, train_dir
from orchestrator.launchers import LAUNCHERS
from orchestrator.launchers.base import Resources
from orchestrator.lifecycle import RUN, Status
from orchestrator.pages import cursor_key, newest_first, page
from orchestrator.schemas import AttemptPublic, JobReport, RunCreate
from orchestrator.settings import Settings
from orchestrator.strict import Count, Cursor, ExperimentName, FilePath, LauncherName, Reason
from trainer.config import Method, TrainConfig, flatten
from trainer.files import LATEST, sha256_file
from trainer.presets import (
    ConfigError,
    apply_overrides,
    preset_version,
    read_yaml,
    resolve_preset,
    validate_config,
)


def resolve_config(body: RunCreate) -> TrainConfig:
    """preset + overrides, or a full config (+ overrides on top), validated by the trainer's own classes."""
    try:
        if body.config is not None and body.preset is not None:
            raise InvalidInputError("give either 'config' or 'preset', not both", field="config")
        if body.config is not None:
            data = body.config.model_dump(mode="json")
        elif body.preset is not None:
            data = read_yaml(resolve_preset(body.preset))
        else:
            data = {}
        cfg = validate_config(apply_overrides(data, body.overrides))
    except ConfigError as exc:
        field = exc.field
        if field is not None and body.config is not None and not any(o.startswith(field) for o in body.overrides):
            field = f"config.{field}"
        elif body.preset is not None and field is None:
            field = "preset"
        raise InvalidInputError(str(exc), field=field or "overrides") from exc
    if not cfg.data.path.is_absolute():  # jobs run in their run folder: pin data to the service's directory
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": cfg.data.path.resolve()})})
    return cfg


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """A validated config and what a submission records of it (read-only: it may be shared)."""

    config: TrainConfig
    config_hash: str
    as_json: dict[str, Any]
    run_name: str


_RESOLVED: dict[tuple[Any, ...], ResolvedConfig] = {}


def resolve_submission(body: RunCreate) -> ResolvedConfig:
    """`resolve_config`, remembered for preset requests per (preset files' version, overrides, working
    directory, which relative data paths resolve against): a sweep or a busy lab submits the same few again
    and again, and validating, dumping and hashing cost a tenth of a submit's CPU. A full config is resolved
    every time (nothing to share)."""
    key: tuple[Any, ...] | None = None
    if body.preset is not None and body.config is None:
        try:
            key = (preset_version(resolve_preset(body.preset)), tuple(body.overrides), str(Path.cwd()))
        except (ConfigError, OSError):
            key = None  # resolve_config reports it, naming the field
        found = _RESOLVED.get(key) if key is not None else None
        if found is not None:
            return found
    cfg = resolve_config(body)
    resolved = ResolvedConfig(cfg, cfg.config_hash(), cfg.model_dump(mode="json"), cfg.default_run_name())
    if key is not None:
        if len(_RESOLVED) >= 1024:  # bounded: distinct override lists are user input
            _RESOLVED.clear()
        _RESOLVED[key] = resolved
    return resolved


class RunFilters(BaseModel):
    """Which runs a list shows and the cursor it resumes after: the REST list's query and the web page's form.
    One model: FastAPI validates a query model in one pydantic-core call, where separate parameters cost it a
    resolution each on every request."""

    model_config = ConfigDict(frozen=True)

    page_token: Cursor | None = Field(None, description="`next_page_token` of the previous page.")
    status: list[Status] = Field(default_factory=list, description="Only runs in these states (repeatable).")
    experiment: ExperimentName | None = Field(None, description="Only the runs of this experiment.")
    method: Method | None = Field(None, description="dino or selfpatch.")
    launcher: LauncherName | None = Field(None, description="Only runs on this launcher (local, slurm, ray, tune).")
    sweep: uuid.UUID | None = Field(None, description="Only the trials of this sweep (its id).")

    def pairs(self) -> list[tuple[str, str]]:
        """The filters as query pairs, without the cursor: what a link to the same list carries."""
        named = (("experiment", self.experiment), ("method", self.method), ("launcher", self.launcher))
        out = [("status", s.value) for s in self.status] + [(k, v) for k, v in named if v]
        return out + ([("sweep", str(self.sweep))] if self.sweep else [])


class ListedAttempt(NamedTuple):
    """An attempt as lists show it: the columns a list reads, in `ATTEMPTS` order (a tuple: cheap to build)."""

    number: int
    backend: str
    backend_job_id: str | None
    host: str | None
    state: str
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    exit_reason: str | None
    accelerators: int
    accelerator_seconds: float | None


@dataclass(slots=True)
class RunListItem:
    """A run as lists show it: plain columns of one SELECT and its attempts, everything but the config.

    Attribute names are the `Run` model's, so pages and REST read a list item as they read a run; building
    no ORM objects makes a page of 50 several times cheaper than loading `Run`s with their relations."""

    id: uuid.UUID
    experiment_name: str
    name: str
    method: str
    status: str
    status_reason: str | None
    launcher: str
    resources: dict[str, Any]
    config_hash: str
    requeues: int
    retry_of_id: uuid.UUID | None
    sweep_id: uuid.UUID | None
    arm: str | None
    seed: int | None
    output_dir: str
    progress: dict[str, Any]
    mlflow_run_id: str | None
    mlflow_experiment_id: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    attempts: list[ListedAttempt]


#: the tables themselves: lists and submissions are plain SQL of a few columns, not ORM units of work
JOBS, RUNS, ATTEMPTS, EXPERIMENTS = (Base.metadata.tables[n] for n in ("jobs", "runs", "attempts", "experiments"))
_LISTED = (
    JOBS.c.id,
    EXPERIMENTS.c.name.label("experiment_name"),
    *(RUNS.c[name] for name in ("name", "method")),
    *(JOBS.c[name] for name in ("status", "status_reason", "launcher", "resources")),
    *(RUNS.c[name] for name in ("config_hash",)),
    JOBS.c.requeues,
    *(RUNS.c[name] for name in ("retry_of_id", "sweep_id", "arm", "seed", "output_dir", "progress")),
    JOBS.c.mlflow_run_id,
    RUNS.c.mlflow_experiment_id,
    *(JOBS.c[name] for name in ("created_by", "created_at", "updated_at", "started_at", "ended_at")),
)
# list items are built from rows by position (several times cheaper than by name): same order
assert [c.name for c in _LISTED] == [f.name for f in dataclasses.fields(RunListItem)][:-1]
_RUN_WIDTH = len(_LISTED)  # a list row: the run's columns, then its attempt's
_ATTEMPT_COLUMNS = tuple(ATTEMPTS.c[name] for name in ListedAttempt._fields)
# REST validates `AttemptPublic` from a listed attempt's attributes: the same fields
assert ListedAttempt._fields == tuple(AttemptPublic.model_fields)


@dataclass(slots=True)
class SubmittedRun(RunListItem):
    """A run just recorded, as its submitter reads it back: a list item with its config and folder."""

    config: dict[str, Any]
    folder: str
    kind: str  # train, or trial for a run of a sweep


def submit_run(
    session: Session,
    settings: Settings,
    body: RunCreate,
    actor: str,
    model: type[Run] = Run,
    reason: str = "submitted by user",
    launcher: str | None = None,
    **fields: Any,
) -> SubmittedRun:
    """Record a queued run (or a trial of a sweep: `model=Trial` with its sweep, arm and seed; a retry with
    `retry_of_id`). Its job, run and event rows in Core, one statement on PostgreSQL: no ORM unit of work and
    no extra round trips on the busiest write of the service."""
    unknown = set(fields) - {"retry_of_id", "sweep_id", "arm", "seed"}
    if unknown:
        raise TypeError(f"submit_run() got unknown run fields {sorted(unknown)}")
    resolved = resolve_submission(body)
    cfg = resolved.config
    session.flush()  # pending rows the run refers to (a sweep created in this transaction) go in first
    experiment_id = get_experiment_id(session, body.experiment)
    run_id = uuid.uuid4()
    folder = settings.runs_root / str(run_id)
    now = utcnow()
    run = SubmittedRun(
        id=run_id,
        experiment_name=body.experiment,
        name=body.name or resolved.run_name,
        method=cfg.method,
        status=Status.QUEUED.value,
        status_reason=None,
        launcher=launcher or body.launcher or settings.default_launcher,
        resources=body.resources.model_dump(mode="json"),
        config_hash=resolved.config_hash,
        requeues=0,
        retry_of_id=fields.get("retry_of_id"),
        sweep_id=fields.get("sweep_id"),
        arm=fields.get("arm"),
        seed=fields.get("seed"),
        output_dir=str(train_dir(folder)),
        progress={},
        mlflow_run_id=None,
        mlflow_experiment_id=None,
        created_by=actor,
        created_at=now,
        updated_at=now,
        started_at=None,
        ended_at=None,
        attempts=[],
        config=resolved.as_json,
        folder=str(folder),
        kind=str(model.__mapper__.polymorphic_identity),
    )
    job = {c: getattr(run, c) for c in _JOB_COLUMNS} | {"mlflow_synced": False}
    row = {c: getattr(run, c) for c in _RUN_COLUMNS} | {"experiment_id": experiment_id, "listed_at": run.created_at}
    submitted: dict[str, Any] = {"preset": body.preset, "overrides": list(body.overrides)} if body.preset else {}
    event = event_row(run.id, "transition", actor, reason, None, Status.QUEUED.value, submitted)
    if session.get_bind().dialect.name == "postgresql":  # one statement, one round trip
        params = {f"job_{k}": v for k, v in job.items()} | {f"run_{k}": v for k, v in row.items()}
        session.execute(_SUBMISSION, params | {f"event_{k}": v for k, v in event.items()})
    else:  # SQLite runs in this process: statements cost no round trip, and it has no data-modifying CTEs
        for table, values in ((JOBS, job), (RUNS, row), (EVENTS, event)):
            session.execute(insert(table), [values])
    return run


def _bound(table: Table, prefix: str, columns: Iterable[str]) -> dict[str, Any]:
    return {c: bindparam(f"{prefix}{c}", type_=table.c[c].type) for c in columns}


#: The columns a submission writes to its job and run rows (their values are the new `Run`'s attributes).
_JOB_COLUMNS = (
    "id",
    "kind",
    "status",
    "launcher",
    "resources",
    "requeues",
    "folder",
    "created_by",
    "created_at",
    "updated_at",
)
_RUN_COLUMNS = (
    "id",
    "name",
    "method",
    "config",
    "config_hash",
    "output_dir",
    "progress",
    "retry_of_id",
    "sweep_id",
    "arm",
    "seed",
)
#: A submission's three rows as one PostgreSQL statement: data-modifying CTEs all run, and the foreign keys
#: between them (run -> job, event -> job) are checked at the end of the statement.
_SUBMISSION = (
    insert(EVENTS)
    .values(_bound(EVENTS, "event_", ("job_id", "kind", "actor", "reason", "from_status", "to_status", "data", "at")))
    .add_cte(insert(JOBS).values(_bound(JOBS, "job_", (*_JOB_COLUMNS, "mlflow_synced"))).cte("submitted_job"))
    .add_cte(
        insert(RUNS).values(_bound(RUNS, "run_", (*_RUN_COLUMNS, "experiment_id", "listed_at"))).cte("submitted_run")
    )
)


def get_run(session: Session, run_id: str | uuid.UUID, *, lock: bool = False) -> Run:
    return get_job(session, Run, run_id, "run", lock=lock)


def list_runs(session: Session, filters: RunFilters, page_size: int) -> tuple[list[RunListItem], str | None]:
    """Newest first, in one SELECT: the page's runs (the listed columns, never the config) joined with their
    attempts. The statement is built once per combination of filters and reused with new parameters."""
    params: dict[str, Any] = {"limit": page_size + 1}
    if filters.status:
        params["status"] = [s.value for s in filters.status]
    for name in ("method", "launcher", "sweep", "experiment"):
        if value := getattr(filters, name):
            params[name] = value
    if filters.page_token:
        params["after_time"], params["after_id"] = cursor_key(filters.page_token, uuid.UUID)
    items: list[RunListItem] = []
    # all rows in one fetch: iterating a result fetches them one by one, a driver call each
    for row in session.execute(_list_statement(frozenset(params)), params).all():
        if not items or items[-1].id != row[0]:  # rows of one run are consecutive: ordered by run first
            items.append(RunListItem(*row[:_RUN_WIDTH], attempts=[]))  # type: ignore[misc]
        if row[_RUN_WIDTH] is not None:  # a run without attempts has one row of NULL attempt columns
            items[-1].attempts.append(ListedAttempt(*row[_RUN_WIDTH:]))
    return page(items, page_size)


@functools.cache
def _list_statement(given: frozenset[str]) -> Select[Any]:
    """The list query for the parameters `given`, with bound parameters only: built (and its cache key
    computed) once per combination, which is most of what building it on every request cost. The page is a
    subquery (its LIMIT counts runs, and the cursor stays an index bound inside it) outer-joined with the
    attempts, so a page is one round trip, not one for the runs and one for their attempts."""
    query = select(*_LISTED).select_from(
        JOBS.join(RUNS, RUNS.c.id == JOBS.c.id).join(EXPERIMENTS, EXPERIMENTS.c.id == RUNS.c.experiment_id)
    )
    if "status" in given:
        query = query.where(JOBS.c.status.in_(bindparam("status", expanding=True)))
    if "method" in given:
        query = query.where(RUNS.c.method == bindparam("method"))
    if "launcher" in given:
        query = query.where(JOBS.c.launcher == bindparam("launcher"))
    if "sweep" in given:
        query = query.where(RUNS.c.sweep_id == bindparam("sweep", type_=RUNS.c.sweep_id.type))
    if "experiment" in given:  # a filter: an experiment that does not exist has no runs
        # its id as a scalar subquery, a constant to the planner: then the run index can give the order (the
        # join on the name could not on PostgreSQL, which orders a nested loop by its outer side only)
        named = select(EXPERIMENTS.c.id).where(EXPERIMENTS.c.name == bindparam("experiment")).scalar_subquery()
        query = query.where(RUNS.c.experiment_id == named)
    # the same key either way: a page of one experiment or sweep walks that run index, whose copy of created_at
    # sits beside the filtered column (an index cannot span jobs and runs); other pages walk a jobs index
    key = (RUNS.c.listed_at, RUNS.c.id) if given & {"experiment", "sweep"} else (JOBS.c.created_at, JOBS.c.id)
    after = None
    if "after_time" in given:
        after = (bindparam("after_time", type_=JOBS.c.created_at.type), bindparam("after_id", type_=JOBS.c.id.type))
    listed = newest_first(query, *key, after).limit(bindparam("limit")).subquery("listed")
    return (
        select(*listed.c, *_ATTEMPT_COLUMNS)
        .select_from(listed.outerjoin(ATTEMPTS, ATTEMPTS.c.job_id == listed.c.id))
        .order_by(listed.c.created_at.desc(), listed.c.id.desc(), ATTEMPTS.c.number)
    )


@dataclass(frozen=True)
class ConfigDiff:
    """A run's config against what it started from: the preset it was submitted with, else the defaults."""

    against: str
    overrides: list[str]
    changed: list[tuple[str, Any, Any]]  # (dotted key, preset value, run value)


def config_diff(session: Session, run: Run) -> ConfigDiff:
    first = session.scalars(
        select(Event).where(Event.job_id == run.id, Event.to_status == Status.QUEUED.value).order_by(Event.id).limit(1)
    ).first()
    data = first.data if first is not None and first.data else {}
    preset = data.get("preset")
    try:
        base = validate_config(read_yaml(resolve_preset(preset)) if preset else {}).model_dump(mode="json")
        against = f"preset {preset}" if preset else "the trainer's defaults"
    except ConfigError:  # a preset renamed or removed since the run was submitted
        base, against = validate_config({}).model_dump(mode="json"), "the trainer's defaults"
    before, after = flatten(base), flatten(run.config)
    keys = sorted(set(before) | set(after))
    changed = [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]
    return ConfigDiff(against, [str(o) for o in data.get("overrides", [])], changed)


def retry_run(session: Session, settings: Settings, run: Run, actor: str) -> SubmittedRun:
    """A new run with the same config (terminal runs never change); links back with retry_of."""
    if not Status(run.status).terminal:
        raise ConflictError(f"run {run.id} is {run.status}; only finished runs can be retried (cancel it first)")
    if run.launcher not in LAUNCHERS:
        raise ConflictError(f"run {run.id} is a trial of a search: retry its sweep (the search resumes it)")
    body = RunCreate(
        experiment=run.experiment.name,
        name=run.name,
        config=TrainConfig.model_validate(run.config),
        launcher=run.launcher,
        resources=Resources.model_validate(run.resources),
    )
    same: dict[str, Any] = {"sweep_id": run.sweep_id, "arm": run.arm, "seed": run.seed} if run.sweep_id else {}
    new = submit_run(session, settings, body, actor, type(run), f"retry of {run.id}", None, retry_of_id=run.id, **same)
    record_event(session, new, "retry", actor, f"retry of {run.id}", retry_of=str(run.id))
    return new


def record_checkpoint(
    session: Session,
    settings: Settings,
    run: Run,
    *,
    attempt: int,
    path: str,
    epoch: int,
    step: int,
    sha256: str,
    kind: str,
    actor: str,
) -> Checkpoint | None:
    """Idempotent: the same (path, sha256) is recorded once, whoever reports it first (job or reconciler).
    A new numbered checkpoint gets the evaluations its experiment's policy asks for."""
    exists = session.scalar(
        select(Checkpoint.id).where(Checkpoint.run_id == run.id, Checkpoint.path == path, Checkpoint.sha256 == sha256)
    )
    if exists is not None:
        return None
    checkpoint = Checkpoint(attempt=attempt, path=path, epoch=epoch, step=step, sha256=sha256, kind=kind)
    run.checkpoints.append(checkpoint)  # the loaded collection sees it too (final-evaluation planning reads it)
    session.flush()
    record_event(session, run, "checkpoint", actor, None, path=path, epoch=epoch, step=step, sha256=sha256)
    if run.experiment.eval_policy.get("benchmarks"):
        plan_for_checkpoint(session, settings, run, checkpoint)
    return checkpoint


def verified_checkpoint(run: Run, path: str, sha256: str) -> Path | None:
    """The checkpoint file if it lies in the run's folder and holds exactly `sha256`; None if it is gone or
    has been rewritten since (checkpoint.pth is, every epoch). A path outside the folder is a JobFileError."""
    found = confined(Path(run.folder), path)
    if not found.is_file():
        return None
    return found if sha256_file(found) == sha256 else None


#: What the service acts on in the trainer's log.jsonl; every other line (metrics) is passed over.
LOG_EVENTS = ('"checkpoint"', '"collapse"')


def train_log(folder: str) -> str:
    """The trainer's log.jsonl in a job folder, as a plain string: built for every running job on every pass."""
    return os.path.join(folder, TRAIN_DIR, "log.jsonl")  # noqa: PTH118 (no Path per job per pass)


def log_lines(run: Run) -> list[str]:
    """Every line of the trainer's log.jsonl (a job's final settling reads it whole, to catch up)."""
    log_file = Path(run.output_dir) / "log.jsonl"
    return log_file.read_text(errors="replace").splitlines() if log_file.exists() else []


def log_events(lines: list[str], name: str) -> list[dict[str, Any]]:
    """The `event: name` records among log lines; a line being written right now is no record yet."""
    found = []
    for line in lines:
        if f'"{name}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


def ingest_checkpoints(
    session: Session, settings: Settings, run: Run, attempt: int, actor: str, lines: list[str]
) -> None:
    """Checkpoints the trainer logged (catches up on reports lost while the service was down): the latest
    entry per file, recorded when the file still holds what the log says."""
    latest: dict[str, dict[str, Any]] = {}
    for record in log_events(lines, "checkpoint"):
        if isinstance(record.get("path"), str):
            latest[record["path"]] = record
    known = {(c.path, c.sha256) for c in run.checkpoints}
    for path, record in latest.items():
        try:
            entry = CheckpointEntry.model_validate(record)
        except ValidationError as exc:
            raise JobFileError(f"log.jsonl: invalid checkpoint entry: {str(exc).splitlines()[0][:200]}") from exc
        if (path, entry.sha256) in known or verified_checkpoint(run, path, entry.sha256) is None:
            continue
        record_checkpoint(
            session,
            settings,
            run,
            attempt=attempt,
            path=path,
            epoch=entry.epoch,
            step=entry.iteration,
            sha256=entry.sha256,
            kind=entry.kind,
            actor=actor,
        )


class CollapseEntry(BaseModel):
    """A collapse line of the trainer's log.jsonl (trainer/diagnostics.py), as the service trusts it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    head: Literal["cls", "patch"]
    mode: Literal["uniform", "one-hot"]
    iteration: Count
    ratio: float = Field(ge=0.0, le=10.0)
    reason: Reason


def collapse_reason(progress: dict[str, Any]) -> str | None:
    """Why the trainer flagged the run as collapsed (what `ingest_collapse` recorded), or None."""
    reason: str | None = (progress.get("collapsed") or {}).get("reason")
    return reason


def ingest_collapse(session: Session, run: Run, actor: str, lines: list[str]) -> None:
    """The trainer found the run collapsed: an event of the run and `progress.collapsed` (REST shows it)."""
    if run.progress.get("collapsed"):
        return
    for record in log_events(lines, "collapse"):
        try:
            entry = CollapseEntry.model_validate(record)
        except ValidationError as exc:
            raise JobFileError(f"log.jsonl: invalid collapse entry: {str(exc).splitlines()[0][:200]}") from exc
        run.progress = {**run.progress, "collapsed": entry.model_dump(mode="json")}
        record_event(session, run, "collapsed", actor, entry.reason, head=entry.head, mode=entry.mode)
        return


class CheckpointEntry(BaseModel):
    """A checkpoint line of the trainer's log.jsonl, as the service trusts it."""

    model_config = ConfigDict(extra="ignore")

    path: FilePath
    epoch: Count
    iteration: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    kind: Literal["epoch", "periodic", "step", "interrupt"] = "epoch"


class TrainKind(KindDefaults):
    """The service side of pretraining jobs."""

    lifecycle = RUN

    def prepare(self, ctx: Context, session: Session, job: Job, attempt: int) -> JobFile:
        assert isinstance(job, Run)
        if ctx.mlflow is not None and not job.mlflow_run_id:
            experiment_id = ctx.mlflow.experiment_id(job.experiment.name)
            tags = {
                "orch.run_id": str(job.id),
                "orch.config_hash": job.config_hash,
                "orch.launcher": job.launcher,
                "method": job.method,
                **self.mlflow_tags(ctx, session, job, experiment_id),
            }
            job.mlflow_experiment_id = experiment_id
            job.mlflow_run_id = ctx.mlflow.create_run(experiment_id, job.name, tags)
            job.experiment.mlflow_experiment_id = experiment_id
        return ctx.job_file(job, {"config": job.config}, job.mlflow_experiment_id, job.mlflow_run_id)

    def mlflow_tags(self, ctx: Context, session: Session, run: Run, experiment_id: str) -> dict[str, str]:
        """Tags beyond the run's own (a sweep's trials add theirs and their parent run)."""
        return {}

    def has_news(self, ctx: Context, folder: str, launcher: str) -> bool:
        tail = ctx.tails.read(train_log(folder))
        if tail.any(*LOG_EVENTS):
            return True
        ctx.tails.advance(tail)  # metrics lines only: nothing for the service to do
        return False

    def running(self, ctx: Context, session: Session, job: Job, attempt: int) -> None:
        assert isinstance(job, Run)
        tail = ctx.tails.read(train_log(job.folder))
        ingest_checkpoints(session, ctx.settings, job, attempt, "reconciler", tail.lines)
        ingest_collapse(session, job, "reconciler", tail.lines)
        ctx.tails.advance_on_commit(session, tail)

    def completed(self, ctx: Context, session: Session, job: Job, attempt: int, result: JobResult) -> tuple[bool, str]:
        assert isinstance(job, Run)
        ingest_checkpoints(session, ctx.settings, job, attempt, "reconciler", log_lines(job))
        final = confined(Path(job.folder), result.checkpoint or Path(job.output_dir) / LATEST)
        if not final.exists():
            return False, "job reported completion but its final checkpoint is missing"
        job.progress = {**job.progress, "iteration": result.iteration}
        if job.experiment.eval_policy.get("benchmarks"):
            plan_final(session, ctx.settings, job)
        return True, "training completed"

    def report(self, ctx: Context, session: Session, job: Job, report: JobReport, actor: str) -> None:
        assert isinstance(job, Run)
        if report.kind == "start":
            job.progress = {**job.progress, "total_iterations": report.total_iterations, "iteration": report.iteration}
        elif report.kind == "heartbeat":
            job.progress = {**job.progress, "iteration": report.iteration, "metrics": report.metrics}
        elif report.kind == "checkpoint":
            if report.path is None or report.sha256 is None or report.epoch is None or report.iteration is None:
                raise InvalidInputError("a checkpoint report needs path, sha256, epoch and iteration", field="path")
            try:
                found = verified_checkpoint(job, report.path, report.sha256)
            except JobFileError as exc:
                raise InvalidInputError(str(exc), field="path") from exc
            if found is None:
                raise InvalidInputError(
                    f"{report.path} does not exist or does not hold sha256 {report.sha256[:12]}", field="sha256"
                )
            record_checkpoint(
                session,
                ctx.settings,
                job,
                attempt=report.attempt,
                path=report.path,
                epoch=report.epoch,
                step=report.iteration,
                sha256=report.sha256,
                kind=report.checkpoint_kind or "epoch",
                actor=actor,
            )


TRAIN = TrainKind()
