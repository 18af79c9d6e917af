"""The service side of a search sweep: its driver job (kind `search`) and the trials it registers.

A search is one job on the Ray launcher that runs a Ray Tune experiment (`orchestrator.jobs.search`). Each
Tune trial registers itself here (`register_trial`, with the search job's token); the service checks the
sampled values against the sweep's search space and records a `Trial` run with the `tune` launcher, which
the reconciler then drives like any run (attempts, checkpoints, MLflow child run, lifecycle). A trial that
ASHA stops early ends `stopped`, with the rung's reason. A failed or lost search job is retried: the next
attempt restores the Tune experiment from its folder (`Tuner.restore`) and its trials continue.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import Job, Search, Sweep, SweepArm, Trial
from orchestrator.errors import ConflictError, InvalidInputError
from orchestrator.evaluations import dataset_key, resolve, validate_policy
from orchestrator.jobs.files import JobFile, JobFileError, JobResult
from orchestrator.jobs.kinds import Context, KindDefaults
from orchestrator.jobs.records import cancel, record_event, transition
from orchestrator.launchers.tune import MAILBOX, METRICS_FILE
from orchestrator.lifecycle import EVALUATION, Status
from orchestrator.runs import resolve_config, submit_run
from orchestrator.schemas import EvalPolicy, JobReport, RunCreate
from orchestrator.settings import Settings
from orchestrator.sweeps.spec import Key, Scalar, SweepSpec, yaml_scalar

#: Attempts of the search job: each retry restores the Tune experiment where the last one stopped.
MAX_ATTEMPTS = 3
TuneTrialId = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="Ray Tune's trial id.")


class TrialRegistration(BaseModel):
    """What a search job sends for one Tune trial: its id and the values Tune sampled."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tune_trial_id: str = TuneTrialId
    params: dict[Key, Scalar] = Field(max_length=20, description="Dotted config key -> the sampled value.")


class RegisteredTrial(BaseModel):
    run_id: uuid.UUID
    folder: str
    status: Status
    created: bool


def validate_search(spec: SweepSpec) -> None:
    """Before anything is written: the base config, one value of every dimension and the monitor are valid."""
    validate_space(spec)
    assert spec.search is not None
    if spec.search.monitor is not None:
        try:
            validate_policy(EvalPolicy(benchmarks=[spec.search.monitor]))
        except InvalidInputError as exc:
            raise InvalidInputError(exc.detail, field=f"search.monitor.{(exc.field or '').rsplit('.', 1)[-1]}") from exc


def validate_space(spec: SweepSpec) -> None:
    """The base config and the configs at the edges of every dimension (its values, or its low bound) resolve."""
    assert spec.search is not None
    base = {"experiment": spec.experiment_name, "preset": spec.base.preset}
    resolve_config(RunCreate.model_validate({**base, "overrides": spec.base.overrides}))
    for key, dimension in spec.search.space.items():
        bounds = dimension.uniform or dimension.loguniform
        if dimension.randint is not None:
            bounds = [dimension.randint[0], dimension.randint[1] - 1]
        values = dimension.choice or dimension.grid or list(bounds or [])
        for value in values:
            try:
                resolve_config(
                    RunCreate.model_validate(
                        {**base, "overrides": [*spec.base.overrides, f"{key}={yaml_scalar(value)}"]}
                    )
                )
            except InvalidInputError as exc:
                raise InvalidInputError(f"search.space.{key}: {exc.detail}", field=f"search.space.{key}") from exc


def search_metrics_file(folder: Path) -> Path:
    """Where a trial's trainable records its objective per epoch."""
    return folder / MAILBOX / METRICS_FILE


def read_search_metrics(folder: Path, limit: int = 100_000) -> list[tuple[int, float]]:
    """(epoch, objective) a trial's trainable recorded, strictly parsed (the file is the job's, not ours)."""
    path = search_metrics_file(folder)
    try:
        if path.stat().st_size > 4 << 20:
            raise JobFileError(f"{path.name} is larger than 4 MiB")
        lines = path.read_text(errors="replace").splitlines()[:limit]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JobFileError(f"{path.name} cannot be read: {exc}") from exc
    history: dict[int, float] = {}
    for line in lines:
        try:
            record = json.loads(line)
            epoch, value = record["epoch"], record["value"]
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
        numbers = isinstance(epoch, int) and isinstance(value, int | float) and not isinstance(value, bool)
        if numbers and not isinstance(epoch, bool) and 0 <= epoch < 10**7 and math.isfinite(value):
            history[epoch] = float(value)
    return sorted(history.items())


def tune_dir(settings: Settings, sweep: Sweep) -> Path:
    """The Tune experiment's folder: the sweep's, so a retried search job restores what the last one did."""
    return settings.home.resolve() / "sweeps" / str(sweep.id)


def driver_resources(spec: SweepSpec) -> dict[str, Any]:
    """The search job itself is light (it samples and schedules); its trials get `trial_cpus`/`trial_gpus`."""
    return {"cpus_per_task": 1, "mem_gb": 2.0, "time_min": spec.resources.time_min}


def create_search_job(session: Session, settings: Settings, sweep: Sweep, spec: SweepSpec, actor: str) -> Search:
    search_id = uuid.uuid4()
    job = Search(
        id=search_id,
        sweep_id=sweep.id,
        status=Status.QUEUED.value,
        launcher="ray",
        resources=driver_resources(spec),
        folder=str(settings.home.resolve() / "searches" / str(search_id)),
        created_by=actor,
        attempts=[],
    )
    session.add(job)
    session.flush()
    record_event(session, job, "transition", actor, f"search of sweep {sweep.name}", to_status=Status.QUEUED.value)
    return job


def search_of(session: Session, sweep: Sweep) -> Search | None:
    return session.scalar(select(Search).where(Search.sweep_id == sweep.id).order_by(Search.created_at.desc()))


def register_trial(
    session: Session, settings: Settings, search: Search, body: TrialRegistration, actor: str
) -> RegisteredTrial:
    """The trial run of one Tune trial: created once (the same id again returns it), with values from the space."""
    if Status(search.status).terminal:
        raise ConflictError(f"search {search.id} has ended ({search.status}): it registers no more trials")
    sweep = session.get(Sweep, search.sweep_id, with_for_update=True)  # one registration at a time per sweep
    assert sweep is not None
    existing = session.scalar(select(Trial).where(Trial.sweep_id == sweep.id, Trial.arm == body.tune_trial_id))
    if existing is not None:
        return RegisteredTrial(run_id=existing.id, folder=existing.folder, status=existing.status, created=False)
    spec = SweepSpec.model_validate(sweep.spec)
    assert spec.search is not None
    space = spec.search.space
    unknown, missing = sorted(set(body.params) - set(space)), sorted(set(space) - set(body.params))
    if unknown or missing:
        key = (unknown or missing)[0]
        where = "not in" if unknown else "missing from"
        raise InvalidInputError(f"params: {key} is {where} the search space", field=f"params.{key}")
    for key, value in body.params.items():
        if not space[key].contains(value):
            why = f"params.{key}={value!r} is outside the search space ({space[key].form})"
            raise InvalidInputError(why, field=f"params.{key}")
    overrides = [*spec.base.overrides, *(f"{k}={yaml_scalar(v)}" for k, v in sorted(body.params.items()))]
    request = RunCreate.model_validate(
        {
            "experiment": spec.experiment_name,
            "name": f"{spec.name}-{body.tune_trial_id}"[:200],
            "preset": spec.base.preset,
            "overrides": overrides,
            "resources": {"cpus_per_task": spec.search.trial_cpus, "gpus_per_node": spec.search.trial_gpus},
        }
    )
    try:
        cfg = resolve_config(request)
    except InvalidInputError as exc:
        raise InvalidInputError(f"params: {exc.detail}", field="params") from exc
    position = len(sweep.arms)
    sweep.arms.append(SweepArm(name=body.tune_trial_id, position=position, overrides={"params": body.params}))
    trial = submit_run(
        session,
        settings,
        request,
        actor,
        Trial,
        f"trial {body.tune_trial_id} of search {spec.name}",
        launcher="tune",
        sweep_id=sweep.id,
        arm=body.tune_trial_id,
        seed=cfg.seed,
    )
    return RegisteredTrial(run_id=trial.id, folder=trial.folder, status=trial.status, created=True)


class SearchKind(KindDefaults):
    """The service side of a search's driver job."""

    lifecycle = EVALUATION  # a failed attempt with attempts left is retried (Tuner.restore)

    def prepare(self, ctx: Context, session: Session, job: Job, attempt: int) -> JobFile:
        assert isinstance(job, Search)
        sweep = session.get(Sweep, job.sweep_id)
        assert sweep is not None
        spec = SweepSpec.model_validate(sweep.spec)
        assert spec.search is not None
        base = resolve_config(RunCreate.model_validate({"preset": spec.base.preset, "overrides": spec.base.overrides}))
        payload: dict[str, Any] = {
            "sweep_id": str(sweep.id),
            "sweep_name": sweep.name,
            "search": spec.search.model_dump(mode="json"),
            "metric": spec.metrics.primary,
            "mode": spec.metrics.direction,
            "epochs": base.optim.epochs,
            "max_concurrent": spec.max_concurrent,
            "trials_path": f"/api/v1/searches/{job.id}/trials",
            "tune_dir": str(tune_dir(ctx.settings, sweep)),
            "monitor": None,
        }
        if spec.search.monitor is not None:
            version, config, _hash = resolve(spec.search.monitor)
            payload["monitor"] = {
                "benchmark": spec.search.monitor.benchmark,
                "config": config,
                "dataset": dataset_key(spec.search.monitor.data),
                "version": version,
            }
        return ctx.job_file(job, payload, None, None)

    def may_launch(self, ctx: Context, session: Session, job: Job) -> str | None:
        assert isinstance(job, Search)
        sweep = session.get(Sweep, job.sweep_id)
        if sweep is not None and sweep.status == "cancelled":
            transition(session, job, Status.CANCELLED, "sweep", f"sweep {sweep.name} cancelled")
            return "sweep cancelled"
        return None

    def completed(self, ctx: Context, session: Session, job: Job, attempt: int, result: JobResult) -> tuple[bool, str]:
        assert isinstance(job, Search)
        trials = session.scalars(select(Trial.status).where(Trial.sweep_id == job.sweep_id)).all()
        counts = {status: trials.count(status) for status in sorted(set(trials))}
        return True, "search finished: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials")

    def retry_failure(self, job: Job) -> str | None:
        done = len(job.attempts)
        if done >= MAX_ATTEMPTS:
            return None
        return f"restoring the Tune experiment as attempt {done + 1} of {MAX_ATTEMPTS}"

    def report(self, ctx: Context, session: Session, job: Job, report: JobReport, actor: str) -> None:
        if report.kind == "checkpoint":
            raise InvalidInputError("search jobs do not report checkpoints", field="kind")

    def terminal(self, session: Session, job: Job, actor: str) -> None:
        """Its trials will not run any more: end those that have not (their folders keep what they did)."""
        assert isinstance(job, Search)
        open_trials = select(Trial).where(
            Trial.sweep_id == job.sweep_id, Trial.status.not_in([s.value for s in Status if s.terminal])
        )
        for trial in session.scalars(open_trials):
            cancel(session, trial, actor, f"its search ended ({job.status})")


SEARCH = SearchKind()
