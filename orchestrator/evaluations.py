"""Evaluations of checkpoints: planned from an experiment's policy (or asked for), deduplicated, launched
by the reconciler on their own launcher queue, and recorded with their metrics.

An evaluation is identified by (checkpoint sha256, benchmark, benchmark version, config hash, dataset):
asking again for the same one returns the existing record and starts nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import Checkpoint, Evaluation, Run
from orchestrator.schemas import EvalPolicy, EvalSpec, EvaluationCreate
from orchestrator.service import InvalidInputError, get_by_id, record_event
from orchestrator.settings import Settings
from trainer.files import atomic_write
from trainer.presets import ConfigError

NUMBERED = re.compile(r"checkpoint(\d{4})\.pth$")
EVAL_FILE, RESULT_FILE = "eval.json", "result.json"
ACTIVE = ("queued", "submitted", "running")


@dataclass(frozen=True)
class EvalJob:
    """What the service hands an evaluation job (`python -m orchestrator.eval_worker EVAL_DIR`)."""

    evaluation_id: str
    run_id: str
    benchmark: str
    config: dict[str, Any]
    dataset: str
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_step: int
    cache_dir: str
    mlflow_tracking_uri: str
    mlflow_experiment_id: str | None
    mlflow_parent_run_id: str | None

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / EVAL_FILE, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=2)))

    @classmethod
    def read(cls, folder: Path) -> EvalJob:
        data = json.loads((folder / EVAL_FILE).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def resolve(spec: EvalSpec | EvaluationCreate) -> tuple[str, dict[str, Any], str]:
    """(benchmark version, resolved config, config hash), validated by the evaluator's own classes."""
    from evaluator.benchmarks import config_hash, get_benchmark

    try:
        benchmark = get_benchmark(spec.benchmark)
        cfg = benchmark.config(spec.config, spec.overrides)
    except ConfigError as exc:
        field = "overrides" if spec.overrides and spec.config in ("tiny", "full") else "config"
        raise InvalidInputError(str(exc), field=field) from exc
    return benchmark.version, cfg.model_dump(mode="json"), config_hash(cfg)


def validate_policy(policy: EvalPolicy) -> None:
    for i, spec in enumerate(policy.benchmarks):
        try:
            resolve(spec)
        except InvalidInputError as exc:
            raise InvalidInputError(exc.detail, field=f"eval_policy.benchmarks.{i}.{exc.field}") from exc


def dedup_key(sha256: str, benchmark: str, version: str, config_hash: str, dataset: str) -> str:
    return hashlib.sha256("\n".join((sha256, benchmark, version, config_hash, dataset)).encode()).hexdigest()


def dataset_key(data: str) -> str:
    """Relative dataset paths are the service's working directory's, like run configs' data paths."""
    path = Path(data)
    return str(path if path.is_absolute() else path.resolve())


def request(
    session: Session,
    settings: Settings,
    run: Run,
    checkpoint: Checkpoint,
    spec: EvalSpec | EvaluationCreate,
    trigger: str,
    actor: str,
) -> tuple[Evaluation, bool]:
    """The evaluation of `checkpoint` that `spec` describes: the existing one, or a new queued one."""
    version, config, config_hash = resolve(spec)
    dataset = dataset_key(spec.data)
    key = dedup_key(checkpoint.sha256, spec.benchmark, version, config_hash, dataset)
    existing = session.scalar(select(Evaluation).where(Evaluation.dedup_key == key))
    if existing is not None:
        return existing, False
    evaluation = Evaluation(
        dedup_key=key,
        run_id=run.id,
        checkpoint_id=checkpoint.id,
        checkpoint_sha256=checkpoint.sha256,
        benchmark=spec.benchmark,
        benchmark_version=version,
        config_name=spec.config + ("+overrides" if spec.overrides else ""),
        config=config,
        config_hash=config_hash,
        dataset=dataset,
        trigger=trigger,
        status="queued",
        launcher=spec.launcher or settings.default_launcher,
        resources=spec.resources.model_dump(mode="json"),
        max_attempts=spec.max_attempts,
        metrics={},
    )
    session.add(evaluation)
    session.flush()
    record_event(
        session,
        run,
        "evaluation",
        actor,
        f"{spec.benchmark} on epoch {checkpoint.epoch} ({trigger})",
        evaluation_id=str(evaluation.id),
        checkpoint=checkpoint.path,
    )
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


def get_evaluation(session: Session, ident: str | uuid.UUID) -> Evaluation:
    return get_by_id(session, Evaluation, ident, "evaluation")


def get_checkpoint(session: Session, ident: str | uuid.UUID) -> Checkpoint:
    return get_by_id(session, Checkpoint, ident, "checkpoint")


def eval_dir(settings: Settings, evaluation: Evaluation) -> Path:
    return settings.runs_root / str(evaluation.run_id) / "evals" / str(evaluation.id)


def compare(session: Session, checkpoint_ids: list[str]) -> tuple[list[Checkpoint], dict[str, dict[str, float | None]]]:
    """Metrics of several checkpoints side by side (latest succeeded evaluation per benchmark)."""
    checkpoints = [get_checkpoint(session, c) for c in checkpoint_ids]
    table: dict[str, dict[str, float | None]] = {}
    for checkpoint in checkpoints:
        rows = session.scalars(
            select(Evaluation)
            .where(Evaluation.checkpoint_sha256 == checkpoint.sha256, Evaluation.status == "succeeded")
            .order_by(Evaluation.created_at)
        )
        for evaluation in rows:
            for name, value in evaluation.metrics.items():
                table.setdefault(name, {})[str(checkpoint.id)] = float(value)
    for name in table:
        for checkpoint in checkpoints:
            table[name].setdefault(str(checkpoint.id), None)
    return checkpoints, dict(sorted(table.items()))
