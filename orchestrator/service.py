"""Domain operations on runs, shared by the REST API, the CLI and the reconciler.

Every function takes the caller's SQLAlchemy session: the caller owns the transaction, so a request's
writes (run, event, idempotency record) commit together or not at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from orchestrator.db.models import Attempt, Checkpoint, Event, Experiment, Run, utcnow
from orchestrator.launchers.base import JobSpec, Resources
from orchestrator.lifecycle import RunStatus, TransitionError, check_transition
from orchestrator.schemas import ExperimentCreate, RunCreate, RunReport
from orchestrator.settings import Settings
from trainer.config import TrainConfig
from trainer.presets import ConfigError, apply_overrides, read_yaml, resolve_preset, validate_config

M = TypeVar("M")


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine code and (for 422) the offending field."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.field = detail, field


class NotFoundError(ServiceError):
    status, code = 404, "not_found"


class ConflictError(ServiceError):
    status, code = 409, "conflict"


class InvalidInputError(ServiceError):
    status, code = 422, "invalid_input"


def run_token(secret: bytes, run_id: uuid.UUID | str) -> str:
    """A run's report credential, derived from the server secret: nothing to store, nothing to leak in SQL."""
    digest = hmac.new(secret, f"run:{run_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def run_token_matches(secret: bytes, run_id: uuid.UUID | str, token: str) -> bool:
    return hmac.compare_digest(run_token(secret, run_id), token)


# ---------------------------------------------------------------------------------------------- config


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


# ---------------------------------------------------------------------------------------------- pages


def encode_cursor(created_at: datetime, ident: uuid.UUID | int) -> str:
    raw = json.dumps([created_at.isoformat(), str(ident)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        created, ident = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), str(ident)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError("page_token is not a token this service issued", field="page_token") from exc


def page_after(
    query: Select[Any], column_time: Any, column_id: Any, page_token: str | None, id_type: Callable[[str], Any]
) -> Select[Any]:
    """Newest first; the cursor is the (created_at, id) of the last item of the previous page."""
    if page_token:
        created, ident = decode_cursor(page_token)
        try:
            key = id_type(ident)
        except ValueError as exc:
            raise InvalidInputError("page_token is not a token this service issued", field="page_token") from exc
        query = query.where(or_(column_time < created, and_(column_time == created, column_id < key)))
    return query.order_by(column_time.desc(), column_id.desc())


# ---------------------------------------------------------------------------------------------- experiments


def get_or_create_experiment(session: Session, name: str, description: str = "") -> Experiment:
    """Race-safe: concurrent first submits to a new experiment create it once (a savepoint absorbs the loser)."""
    found = session.scalar(select(Experiment).where(Experiment.name == name))
    if found is not None:
        return found
    try:
        with session.begin_nested():
            experiment = Experiment(name=name, description=description, eval_policy={})
            session.add(experiment)
        return experiment
    except IntegrityError:
        found = session.scalar(select(Experiment).where(Experiment.name == name))
        if found is None:
            raise
        return found


def create_experiment(session: Session, body: ExperimentCreate) -> Experiment:
    if session.scalar(select(Experiment.id).where(Experiment.name == body.name)) is not None:
        raise ConflictError(f"an experiment named {body.name!r} exists", field="name")
    experiment = Experiment(
        name=body.name, description=body.description, eval_policy=body.eval_policy.model_dump(mode="json")
    )
    session.add(experiment)
    session.flush()
    return experiment


def get_experiment(session: Session, ident: str) -> Experiment:
    query = select(Experiment)
    try:
        query = query.where(Experiment.id == uuid.UUID(ident))
    except ValueError:
        query = query.where(Experiment.name == ident)
    found = session.scalar(query)
    if found is None:
        raise NotFoundError(f"no experiment {ident!r}")
    return found


# ---------------------------------------------------------------------------------------------- runs


def record_event(
    session: Session,
    run: Run,
    kind: str,
    actor: str,
    reason: str | None = None,
    *,
    from_status: str | None = None,
    to_status: str | None = None,
    **data: Any,
) -> Event:
    event = Event(
        run_id=run.id, kind=kind, actor=actor, reason=reason, from_status=from_status, to_status=to_status, data=data
    )
    session.add(event)
    return event


def transition(
    session: Session, run: Run, target: RunStatus, actor: str, reason: str | None = None, **data: Any
) -> None:
    """Apply one lifecycle step and log it; refuses what the state machine forbids (TransitionError)."""
    current = RunStatus(run.status)
    check_transition(current, target)
    run.status = target.value
    run.status_reason = reason
    now = utcnow()
    if target == RunStatus.RUNNING and run.started_at is None:
        run.started_at = now
    if target.terminal:
        run.ended_at = now
    record_event(session, run, "transition", actor, reason, from_status=current.value, to_status=target.value, **data)


def submit_run(session: Session, settings: Settings, body: RunCreate, actor: str) -> Run:
    cfg = resolve_config(body)
    experiment = get_or_create_experiment(session, body.experiment)
    run_id = uuid.uuid4()
    run_dir = settings.runs_root / str(run_id)
    run = Run(
        id=run_id,
        experiment=experiment,
        name=body.name or cfg.default_run_name(),
        method=cfg.method,
        config=cfg.model_dump(mode="json"),
        config_hash=cfg.config_hash(),
        launcher=body.launcher or settings.default_launcher,
        resources=body.resources.model_dump(mode="json"),
        status=RunStatus.QUEUED.value,
        output_dir=str(run_dir / "train"),
        progress={},
        created_by=actor,
    )
    session.add(run)
    session.flush()
    record_event(session, run, "transition", actor, "submitted by user", to_status=RunStatus.QUEUED.value)
    return run


def parse_uuid(ident: str | uuid.UUID, what: str) -> uuid.UUID:
    """A UUID from a path parameter; anything else is simply not found (404), never a 500."""
    try:
        return ident if isinstance(ident, uuid.UUID) else uuid.UUID(str(ident))
    except ValueError as exc:
        raise NotFoundError(f"no {what} {ident!r}") from exc


def get_by_id(session: Session, model: type[M], ident: str | uuid.UUID, what: str) -> M:
    found = session.get(model, parse_uuid(ident, what))
    if found is None:
        raise NotFoundError(f"no {what} {ident!r}")
    return found


def get_run(session: Session, run_id: str | uuid.UUID, *, lock: bool = False) -> Run:
    ident = parse_uuid(run_id, "run")
    query = select(Run).where(Run.id == ident).options(selectinload(Run.attempts), selectinload(Run.experiment))
    if lock:
        query = query.with_for_update()
    run = session.scalar(query)
    if run is None:
        raise NotFoundError(f"no run {run_id!r}")
    return run


def list_runs(
    session: Session,
    *,
    page_size: int,
    page_token: str | None,
    status: list[RunStatus] | None = None,
    experiment: str | None = None,
) -> tuple[list[Run], str | None]:
    query = select(Run).options(selectinload(Run.attempts), selectinload(Run.experiment))
    if status:
        query = query.where(Run.status.in_([s.value for s in status]))
    if experiment:
        query = query.where(Run.experiment_id == get_experiment(session, experiment).id)
    query = page_after(query, Run.created_at, Run.id, page_token, uuid.UUID).limit(page_size + 1)
    runs = list(session.scalars(query))
    more = len(runs) > page_size
    runs = runs[:page_size]
    return runs, encode_cursor(runs[-1].created_at, runs[-1].id) if more and runs else None


def request_cancel(session: Session, run: Run, actor: str, reason: str | None = None) -> None:
    """Queued runs end at once; others end here too, and the reconciler stops their job."""
    current = RunStatus(run.status)
    if current.terminal:
        raise ConflictError(f"run {run.id} is already {current}: terminal states never change")
    transition(session, run, RunStatus.CANCELLED, actor, reason or "cancelled by user")


def retry_run(session: Session, settings: Settings, run: Run, actor: str) -> Run:
    """A new run with the same config (terminal runs never change); links back with retry_of."""
    if not RunStatus(run.status).terminal:
        raise ConflictError(f"run {run.id} is {run.status}; only finished runs can be retried (cancel it first)")
    body = RunCreate(
        experiment=run.experiment.name,
        name=run.name,
        config=TrainConfig.model_validate(run.config),
        launcher=run.launcher,
        resources=Resources.model_validate(run.resources),
    )
    new = submit_run(session, settings, body, actor)
    new.retry_of_id = run.id
    record_event(session, new, "retry", actor, f"retry of {run.id}", retry_of=str(run.id))
    return new


def current_attempt(run: Run) -> Attempt | None:
    return run.attempts[-1] if run.attempts else None


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
    checkpoint = Checkpoint(run_id=run.id, attempt=attempt, path=path, epoch=epoch, step=step, sha256=sha256, kind=kind)
    session.add(checkpoint)
    session.flush()
    record_event(session, run, "checkpoint", actor, None, path=path, epoch=epoch, step=step, sha256=sha256)
    if run.experiment.eval_policy.get("benchmarks"):
        from orchestrator.evaluations import plan_for_checkpoint

        plan_for_checkpoint(session, settings, run, checkpoint)
    return checkpoint


def apply_report(session: Session, settings: Settings, run: Run, report: RunReport) -> None:
    """A job's own account of its progress. Success is never taken from a report alone: the reconciler
    settles the run once the scheduler confirms that the job has exited."""
    actor = f"job:attempt-{report.attempt}"
    attempt = next((a for a in run.attempts if a.number == report.attempt), None)
    now = utcnow()
    run.last_heartbeat_at = now
    if report.kind == "start":
        if attempt is None:  # a scheduler-side requeue (SLURM) starts a new attempt on the same job id
            last = current_attempt(run)
            attempt = Attempt(
                run=run,
                number=report.attempt,
                backend=run.launcher,
                backend_job_id=report.job_id or (last.backend_job_id if last else None),
                accelerators=last.accelerators if last else 0,
                log_path=last.log_path if last else None,
            )
            session.add(attempt)
            record_event(session, run, "attempt", actor, "scheduler requeued the job", number=report.attempt)
        attempt.state, attempt.host = "running", report.host
        attempt.started_at = attempt.started_at or now
        status = RunStatus(run.status)
        if status in (RunStatus.SUBMITTED, RunStatus.REQUEUED):
            transition(session, run, RunStatus.RUNNING, actor, f"started on {report.host}")
        elif status == RunStatus.PREEMPTED:
            transition(session, run, RunStatus.REQUEUED, actor, "scheduler requeued the job")
            transition(session, run, RunStatus.RUNNING, actor, f"started on {report.host}")
        run.progress = {**run.progress, "total_iterations": report.total_iterations, "iteration": report.iteration}
    elif report.kind == "heartbeat":
        run.progress = {**run.progress, "iteration": report.iteration, "metrics": report.metrics}
    elif report.kind == "checkpoint":
        if report.path is None or report.sha256 is None or report.epoch is None or report.iteration is None:
            raise InvalidInputError("a checkpoint report needs path, sha256, epoch and iteration", field="path")
        record_checkpoint(
            session,
            settings,
            run,
            attempt=report.attempt,
            path=report.path,
            epoch=report.epoch,
            step=report.iteration,
            sha256=report.sha256,
            kind=report.checkpoint_kind or "epoch",
            actor=actor,
        )
    elif report.kind == "end":
        record_event(session, run, "job_end", actor, report.reason, status=report.status, iteration=report.iteration)


def job_spec(run: Run, attempt: int, python: str) -> JobSpec:
    run_dir = Path(run.output_dir).parent
    return JobSpec(
        run_id=str(run.id),
        attempt=attempt,
        name=f"orch-{run.name}-{str(run.id)[:8]}",
        argv=[python, "-m", "orchestrator.worker", str(run_dir), "--attempt", str(attempt)],
        workdir=run_dir,
        resources=Resources.model_validate(run.resources),
    )


__all__ = [
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "ServiceError",
    "TransitionError",
    "apply_report",
    "create_experiment",
    "get_run",
    "list_runs",
    "request_cancel",
    "resolve_config",
    "retry_run",
    "submit_run",
    "transition",
]
