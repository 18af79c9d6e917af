"""Evaluations of checkpoints: a kind of job, planned from an experiment's policy (or asked for by hand),
deduplicated, launched by the reconciler on their own launcher queue, retried, and recorded with metrics.

An evaluation is identified by (checkpoint sha256, benchmark, benchmark version, config hash, dataset):
asking again for one that exists (queued, running or succeeded) returns it and starts nothing; a failed or
cancelled one can be asked for again, or retried, which makes a new evaluation linked by `retry_of`.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from evaluator.config import config_hash, get_spec
from orchestrator.db.models import Checkpoint, Evaluation, Job, Run
from orchestrator.errors import ConflictError, InvalidInputError, NotFoundError
from orchestrator.jobs.files import JobFile, JobResult
from orchestrator.jobs.kinds import Context, KindDefaults
from orchestrator.jobs.records import get_job, parse_uuid, record_event
from orchestrator.lifecycle import EVALUATION, Status
from orchestrator.schemas import EvalPolicy, EvalSpec, EvaluationCreate, JobReport
from orchestrator.settings import Settings
from trainer.files import NUMBERED
from trainer.presets import ConfigError


def resolve(spec: EvalSpec | EvaluationCreate) -> tuple[str, dict[str, Any], str]:
    """(benchmark version, resolved config, config hash), validated by the evaluator's own classes."""
    try:
        benchmark = get_spec(spec.benchmark)
        cfg = benchmark.config(spec.config, spec.overrides)
    except ConfigError as exc:
        field = "overrides" if spec.overrides and spec.config in ("tiny", "full") else "config"
        raise InvalidInputError(str(exc), field=field) from exc
    return benchmark.version, cfg.model_dump(mode="json"), config_hash(cfg)


def dataset_key(data: str) -> str:
    """Relative dataset paths are the service's working directory's, like run configs' data paths; the
    dataset must exist when the evaluation is asked for (jobs see the service's filesystem)."""
    path = Path(data)
    try:
        resolved = path if path.is_absolute() else path.resolve()
        found = resolved.exists()
    except (OSError, RuntimeError, ValueError) as exc:  # a name too long for the filesystem, a symlink loop
        raise InvalidInputError(f"dataset {data[:200]!r} cannot be looked up: {exc}", field="data") from exc
    if not found:
        raise InvalidInputError(f"dataset {data[:200]!r} does not exist (looked at {resolved})", field="data")
    return str(resolved)


def validate_policy(policy: EvalPolicy) -> None:
    for i, spec in enumerate(policy.benchmarks):
        try:
            resolve(spec)
            dataset_key(spec.data)
        except InvalidInputError as exc:
            raise InvalidInputError(exc.detail, field=f"eval_policy.benchmarks.{i}.{exc.field}") from exc


def dedup_key(sha256: str, benchmark: str, version: str, config_hash: str, dataset: str) -> str:
    return hashlib.sha256("\n".join((sha256, benchmark, version, config_hash, dataset)).encode()).hexdigest()


def folder_for(settings: Settings, run_id: uuid.UUID, evaluation_id: uuid.UUID) -> Path:
    return settings.runs_root / str(run_id) / "evals" / str(evaluation_id)


def _live(session: Session, key: str) -> Evaluation | None:
    return session.scalar(select(Evaluation).where(Evaluation.dedup_key == key, Evaluation.live.is_(True)))


def request(
    session: Session,
    settings: Settings,
    run: Run,
    checkpoint: Checkpoint,
    spec: EvalSpec | EvaluationCreate,
    trigger: str,
    actor: str,
) -> tuple[Evaluation, bool]:
    """The evaluation of `checkpoint` that `spec` describes: the live one, or a new queued one."""
    version, config, cfg_hash = resolve(spec)
    dataset = dataset_key(spec.data)
    return _create(
        session,
        settings,
        run,
        checkpoint,
        actor,
        f"{spec.benchmark} on epoch {checkpoint.epoch} ({trigger})",
        dedup_key=dedup_key(checkpoint.sha256, spec.benchmark, version, cfg_hash, dataset),
        launcher=spec.launcher or settings.eval_launcher or settings.default_launcher,
        resources=spec.resources.model_dump(mode="json"),
        benchmark=spec.benchmark,
        benchmark_version=version,
        config_name=spec.config + ("+overrides" if spec.overrides else ""),
        config=config,
        config_hash=cfg_hash,
        dataset=dataset,
        trigger=trigger,
        max_attempts=spec.max_attempts,
    )


def retry_evaluation(session: Session, settings: Settings, evaluation: Evaluation, actor: str) -> Evaluation:
    """A new evaluation of the same checkpoint, benchmark and config; only failed or cancelled ones."""
    if Status(evaluation.status) not in (Status.FAILED, Status.CANCELLED):
        raise ConflictError(
            f"evaluation {evaluation.id} is {evaluation.status}; only failed or cancelled evaluations can be retried"
        )
    same = ("dedup_key", "launcher", "resources", "benchmark", "benchmark_version", "config_name", "config")
    more = ("config_hash", "dataset", "max_attempts")
    fields = {name: getattr(evaluation, name) for name in (*same, *more)}
    new, _ = _create(
        session,
        settings,
        evaluation.run,
        evaluation.checkpoint,
        actor,
        f"retry of {evaluation.id}",
        trigger="retry",
        retry_of_id=evaluation.id,
        **fields,
    )
    return new


def _create(
    session: Session,
    settings: Settings,
    run: Run,
    checkpoint: Checkpoint,
    actor: str,
    why: str,
    **fields: Any,
) -> tuple[Evaluation, bool]:
    """A new queued evaluation, unless a live one holds the same dedup key (then that one, not created)."""
    existing = _live(session, fields["dedup_key"])
    if existing is not None:
        return existing, False
    evaluation_id = uuid.uuid4()
    evaluation = Evaluation(
        id=evaluation_id,
        status=Status.QUEUED.value,
        folder=str(folder_for(settings, run.id, evaluation_id)),
        created_by=actor,
        live=True,
        run_id=run.id,
        checkpoint_id=checkpoint.id,
        checkpoint_sha256=checkpoint.sha256,
        metrics={},
        **fields,
    )
    try:
        with session.begin_nested():  # a concurrent request for the same key may win: then return its record
            session.add(evaluation)
    except IntegrityError:
        existing = _live(session, fields["dedup_key"])
        if existing is None:
            raise
        return existing, False
    record_event(session, evaluation, "transition", actor, why, to_status=Status.QUEUED.value)
    record_event(session, run, "evaluation", actor, why, evaluation_id=str(evaluation.id), checkpoint=checkpoint.path)
    return evaluation, True


def policy_of(run: Run) -> EvalPolicy:
    return EvalPolicy.model_validate(run.experiment.eval_policy or {})


def plan_for_checkpoint(session: Session, settings: Settings, run: Run, checkpoint: Checkpoint) -> list[Evaluation]:
    """Evaluations the policy wants on a newly recorded numbered checkpoint (every N epochs)."""
    if NUMBERED.search(checkpoint.path) is None:
        return []  # checkpoint.pth is rewritten every epoch: only numbered files are stable
    planned = []
    for spec in policy_of(run).benchmarks:
        if spec.every_n_epochs and checkpoint.epoch % spec.every_n_epochs == 0:
            evaluation, created = request(session, settings, run, checkpoint, spec, "policy:every_n", "policy")
            if created:
                planned.append(evaluation)
    return planned


def plan_final(session: Session, settings: Settings, run: Run) -> list[Evaluation]:
    """Evaluations of the final checkpoint, once the run has succeeded."""
    numbered = [c for c in run.checkpoints if NUMBERED.search(c.path)]
    specs = [s for s in policy_of(run).benchmarks if s.final]
    if not numbered or not specs:
        return []
    final = max(numbered, key=lambda c: (c.epoch, c.step))
    planned = []
    for spec in specs:
        evaluation, created = request(session, settings, run, final, spec, "policy:final", "policy")
        if created:
            planned.append(evaluation)
    return planned


def get_evaluation(session: Session, ident: str | uuid.UUID, *, lock: bool = False) -> Evaluation:
    return get_job(session, Evaluation, ident, "evaluation", lock=lock)


def get_checkpoint(session: Session, ident: str | uuid.UUID) -> Checkpoint:
    found = session.get(Checkpoint, parse_uuid(ident, "checkpoint"))
    if found is None:
        raise NotFoundError(f"no checkpoint {ident!r}")
    return found


def compare(session: Session, checkpoint_ids: list[str]) -> tuple[list[Checkpoint], dict[str, dict[str, float | None]]]:
    """Metrics of several checkpoints side by side (latest succeeded evaluation per benchmark)."""
    checkpoints = [get_checkpoint(session, c) for c in checkpoint_ids]
    table: dict[str, dict[str, float | None]] = {}
    for checkpoint in checkpoints:
        rows = session.scalars(
            select(Evaluation)
            .where(Evaluation.checkpoint_sha256 == checkpoint.sha256, Evaluation.status == Status.SUCCEEDED.value)
            .order_by(Evaluation.created_at)
        )
        for evaluation in rows:
            for name, value in evaluation.metrics.items():
                table.setdefault(name, {})[str(checkpoint.id)] = float(value)
    for name in table:
        for checkpoint in checkpoints:
            table[name].setdefault(str(checkpoint.id), None)
    return checkpoints, dict(sorted(table.items()))


def error_of(evaluation: Evaluation) -> str | None:
    """Why it failed; while it is retried, why the last attempt failed."""
    if Status(evaluation.status) == Status.FAILED:
        return evaluation.status_reason
    failed = [a.exit_reason for a in evaluation.attempts if a.state == "ended" and a.exit_code not in (0, None)]
    return failed[-1] if failed else None


class EvaluateKind(KindDefaults):
    """The service side of evaluation jobs."""

    lifecycle = EVALUATION

    def prepare(self, ctx: Context, session: Session, job: Job, attempt: int) -> JobFile:
        assert isinstance(job, Evaluation)
        run = job.run
        checkpoint = job.checkpoint
        payload = {
            "run_id": str(run.id),
            "benchmark": job.benchmark,
            "config": job.config,
            "dataset": job.dataset,
            "checkpoint": checkpoint.path,
            "checkpoint_sha256": job.checkpoint_sha256,
            "checkpoint_step": checkpoint.step,
            "cache_dir": str(ctx.settings.home.resolve() / "feature-cache"),
        }
        return ctx.job_file(job, payload, run.mlflow_experiment_id, run.mlflow_run_id)

    def completed(self, ctx: Context, session: Session, job: Job, attempt: int, result: JobResult) -> tuple[bool, str]:
        assert isinstance(job, Evaluation)
        if not result.metrics:
            return False, "the evaluation completed without metrics"
        job.metrics = dict(result.metrics)
        job.seconds = result.seconds
        job.mlflow_run_id = result.mlflow_run_id or job.mlflow_run_id
        job.mlflow_synced = job.mlflow_run_id is not None  # the job closed its child run itself
        return True, f"{job.benchmark} completed"

    def retry_failure(self, job: Job) -> str | None:
        assert isinstance(job, Evaluation)
        done = len(job.attempts)
        return f"retrying as attempt {done + 1} of {job.max_attempts}" if done < job.max_attempts else None

    def report(self, ctx: Context, session: Session, job: Job, report: JobReport, actor: str) -> None:
        if report.kind == "checkpoint":
            raise InvalidInputError("evaluation jobs do not report checkpoints", field="kind")

    def terminal(self, session: Session, job: Job, actor: str) -> None:
        assert isinstance(job, Evaluation)
        status = Status(job.status)
        if status in (Status.FAILED, Status.CANCELLED):
            job.live = False  # its dedup key is free: the evaluation can be asked for again
        why = f"{job.benchmark} {status}" + (f": {job.status_reason}" if status != Status.SUCCEEDED else "")
        data: dict[str, Any] = {"evaluation_id": str(job.id)}
        if status == Status.SUCCEEDED:
            data["metrics"] = job.metrics
        record_event(session, job.run, "evaluation", actor, why, **data)


EVALUATE = EvaluateKind()
