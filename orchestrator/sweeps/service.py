"""Sweeps as records: create (idempotent, resumable, extendable), list, cancel, retry failed trials, and the
numbers a report is made of. Every function takes the caller's session (the caller owns the transaction).

A sweep is identified by its name and the hash of its science (`SweepSpec.spec_hash`). Creating it again
with the same file creates nothing; with more arms or seeds (`extend`) it adds only the missing trials; with
a changed base, evaluations or metrics it is refused with a readable diff. Trials are runs of kind `trial`
(one per arm and seed); the reconciler launches them within the sweep's concurrency cap and budget.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.db.models import Attempt, Evaluation, Experiment, Run, Sweep, SweepArm, SweepEvent, Trial, utcnow
from orchestrator.errors import ConflictError, NotFoundError
from orchestrator.evaluations import validate_policy
from orchestrator.experiments import get_or_create_experiment
from orchestrator.jobs.records import cancel, parse_uuid
from orchestrator.lifecycle import TERMINAL, Status
from orchestrator.runs import SubmittedRun, collapse_reason, resolve_config, retry_run, submit_run
from orchestrator.schemas import EvalPolicy, RunCreate
from orchestrator.settings import Settings
from orchestrator.sweeps.search import create_search_job, search_of, validate_search
from orchestrator.sweeps.spec import SweepSpec, TrialPlan, diff, extension_of, plan
from trainer.files import NUMBERED

ACTIVE, COMPLETED, CANCELLED = "active", "completed", "cancelled"
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


def sweep_event(session: Session, sweep: Sweep, kind: str, actor: str, reason: str | None = None, **data: Any) -> None:
    session.add(SweepEvent(sweep_id=sweep.id, kind=kind, actor=actor, reason=reason, data=data))


def trial_request(spec: SweepSpec, trial: TrialPlan) -> RunCreate:
    return RunCreate.model_validate(
        {
            "experiment": spec.experiment_name,
            "name": f"{spec.name}-{trial.arm}-s{trial.seed}"[:200],
            "preset": spec.base.preset,
            "overrides": trial.overrides,
            "launcher": spec.launcher,
            "resources": spec.resources.model_dump(mode="json"),
        }
    )


@dataclass(frozen=True)
class Created:
    sweep: Sweep
    created: bool  # a new sweep
    added: int  # trials added (all of them for a new sweep, the missing ones for an extension)


def create_sweep(session: Session, settings: Settings, spec: SweepSpec, actor: str, extend: bool = False) -> Created:
    """The sweep this file describes: new, the same one again (nothing created), or extended."""
    requests = {(t.arm, t.seed): trial_request(spec, t) for t in plan(spec)}
    for request in requests.values():  # every trial's config is valid before anything is written
        resolve_config(request)
    validate_policy(EvalPolicy(benchmarks=spec.evaluations))
    if spec.search is not None:
        validate_search(spec)
    existing = session.scalar(select(Sweep).where(Sweep.name == spec.name))
    if existing is None:
        try:
            with session.begin_nested():  # concurrent creates of one file: one sweep, the others find it
                sweep = _new_sweep(session, spec, actor)
        except IntegrityError:
            existing = session.scalar(select(Sweep).where(Sweep.name == spec.name))
            if existing is None:
                raise
        else:
            added = _add_trials(session, settings, sweep, spec, requests, actor)
            if spec.search is not None:
                create_search_job(session, settings, sweep, spec, actor)
            what = f"{added} trials" if spec.search is None else f"a search of {spec.search.num_samples} samples"
            sweep_event(session, sweep, "created", actor, what, spec_hash=sweep.spec_hash)
            return Created(sweep, True, added)
    old = SweepSpec.model_validate(existing.spec)
    if existing.spec_hash != spec.spec_hash():
        why = extension_of(old, spec) if extend else "the sweep file changed (pass --extend to add arms or seeds)"
        if why is not None:
            lines = "\n".join(diff(old.science(), spec.science()))
            raise ConflictError(f"sweep {spec.name!r} exists with another spec: {why}\n{lines}", field="spec")
        existing.spec, existing.spec_hash = spec.model_dump(mode="json", by_alias=True), spec.spec_hash()
        _sync_arms(session, existing, spec)
        if existing.status == COMPLETED:
            existing.status, existing.ended_at, existing.report_logged = ACTIVE, None, False
    elif (existing.spec.get("max_concurrent"), existing.spec.get("budget")) != (
        spec.max_concurrent,
        spec.budget.model_dump(mode="json"),
    ):
        existing.spec = spec.model_dump(mode="json", by_alias=True)  # where and how much may change
    added = _add_trials(session, settings, existing, spec, requests, actor)
    if added:
        sweep_event(session, existing, "extended", actor, f"{added} trials added", spec_hash=existing.spec_hash)
    return Created(existing, False, added)


def _new_sweep(session: Session, spec: SweepSpec, actor: str) -> Sweep:
    experiment = get_or_create_experiment(session, spec.experiment_name, f"sweep {spec.name}")
    experiment.eval_policy = EvalPolicy(benchmarks=spec.evaluations).model_dump(mode="json")
    sweep = Sweep(
        name=spec.name,
        spec_hash=spec.spec_hash(),
        spec=spec.model_dump(mode="json", by_alias=True),
        experiment_id=experiment.id,
        status=ACTIVE,
        report_logged=False,
        created_by=actor,
    )
    session.add(sweep)
    session.flush()
    _sync_arms(session, sweep, spec)
    return sweep


def _sync_arms(session: Session, sweep: Sweep, spec: SweepSpec) -> None:
    known = {arm.name for arm in sweep.arms}
    for position, arm in enumerate(spec.arm_list):
        if arm.name not in known:
            sweep.arms.append(SweepArm(name=arm.name, position=position, overrides={"overrides": arm.overrides}))
    session.flush()


def _add_trials(
    session: Session,
    settings: Settings,
    sweep: Sweep,
    spec: SweepSpec,
    requests: dict[tuple[str, int], RunCreate],
    actor: str,
) -> int:
    """A trial for every (arm, seed) of the plan that has none yet: never two for one pair."""
    have = {
        (arm, seed) for arm, seed in session.execute(select(Trial.arm, Trial.seed).where(Trial.sweep_id == sweep.id))
    }
    added = 0
    for (arm, seed), request in requests.items():
        if (arm, seed) in have:
            continue
        submit_run(
            session,
            settings,
            request,
            actor,
            Trial,
            f"trial of sweep {spec.name}",
            sweep_id=sweep.id,
            arm=arm,
            seed=seed,
        )
        added += 1
    return added


def get_sweep(session: Session, ident: str | uuid.UUID) -> Sweep:
    """By id or by name."""
    try:
        found = session.get(Sweep, parse_uuid(ident, "sweep"))
    except NotFoundError:
        found = session.scalar(select(Sweep).where(Sweep.name == str(ident)[:100]))
    if found is None:
        raise NotFoundError(f"no sweep {str(ident)[:100]!r}")
    return found


def trials_of(session: Session, sweep: Sweep) -> list[Trial]:
    """The latest trial of every (arm, seed) (a retried pair has more than one), in plan order."""
    rows = session.scalars(select(Trial).where(Trial.sweep_id == sweep.id).order_by(Trial.created_at)).all()
    latest: dict[tuple[str | None, int | None], Trial] = {}
    for trial in rows:
        latest[(trial.arm, trial.seed)] = trial
    order = {arm.name: arm.position for arm in sweep.arms}
    return sorted(latest.values(), key=lambda t: (order.get(t.arm or "", 1 << 30), t.seed or 0))


def cancel_sweep(session: Session, sweep: Sweep, actor: str) -> int:
    """Cancel every trial that has not ended, and the search (the reconciler stops their jobs); returns how
    many trials."""
    if sweep.status == CANCELLED:
        raise ConflictError(f"sweep {sweep.name} is already cancelled")
    search = search_of(session, sweep)
    if search is not None and not Status(search.status).terminal:
        cancel(session, search, actor, f"sweep {sweep.name} cancelled")
    stopped = 0
    for trial in session.scalars(select(Trial).where(Trial.sweep_id == sweep.id, Trial.status.not_in(TERMINAL_VALUES))):
        cancel(session, trial, actor, f"sweep {sweep.name} cancelled")
        stopped += 1
    sweep.status, sweep.status_reason, sweep.ended_at = CANCELLED, f"cancelled by {actor}", utcnow()
    sweep_event(session, sweep, "cancelled", actor, f"{stopped} trials stopped")
    return stopped


def retry_failed(session: Session, settings: Settings, sweep: Sweep, actor: str) -> list[SubmittedRun]:
    """A new trial for every (arm, seed) whose latest trial failed or was cancelled; for a search, a new search
    job that restores the Tune experiment (its unfinished and errored trials continue)."""
    search = search_of(session, sweep)
    if search is not None:
        if not Status(search.status).terminal or search.status == Status.SUCCEEDED.value:
            raise ConflictError(f"the search of sweep {sweep.name} is {search.status}: nothing to retry")
        create_search_job(session, settings, sweep, SweepSpec.model_validate(sweep.spec), actor)
        sweep.status, sweep.status_reason, sweep.ended_at, sweep.report_logged = ACTIVE, None, None, False
        sweep_event(session, sweep, "retried", actor, "the search restores its Tune experiment")
        return []
    retried = [
        retry_run(session, settings, trial, actor)
        for trial in trials_of(session, sweep)
        if trial.status in (Status.FAILED.value, Status.CANCELLED.value)
    ]
    if retried:
        sweep.status, sweep.status_reason, sweep.ended_at, sweep.report_logged = ACTIVE, None, None, False
        sweep_event(session, sweep, "retried", actor, f"{len(retried)} trials retried")
    return retried


def accelerator_seconds(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, float]:
    """Accelerator-seconds of every attempt of the given jobs: closed ones (preempted included) as recorded,
    running ones up to now (a budget counts what is being spent, not only what has been)."""
    totals: dict[uuid.UUID, float] = defaultdict(float)
    now = utcnow()
    rows = session.execute(
        select(
            Attempt.job_id, Attempt.state, Attempt.accelerator_seconds, Attempt.started_at, Attempt.accelerators
        ).where(Attempt.job_id.in_(job_ids))
    )
    for job_id, state, seconds, started, accelerators in rows:
        if state == "ended":
            totals[job_id] += float(seconds or 0.0)
        elif started is not None:
            totals[job_id] += max((now - started).total_seconds(), 0.0) * accelerators
    return totals


def sweep_cost(session: Session, sweep: Sweep) -> dict[uuid.UUID, float]:
    """Accelerator-seconds per trial (every attempt of every trial of the sweep, and of its evaluations)."""
    trials = session.scalars(select(Trial.id).where(Trial.sweep_id == sweep.id)).all()
    evaluations = session.execute(select(Evaluation.id, Evaluation.run_id).where(Evaluation.run_id.in_(trials))).all()
    seconds = accelerator_seconds(session, [*trials, *(e for e, _ in evaluations)])
    per_trial = {trial: seconds.get(trial, 0.0) for trial in trials}
    for evaluation, run in evaluations:
        per_trial[run] += seconds.get(evaluation, 0.0)
    return per_trial


def final_metrics(session: Session, trial: Run) -> dict[str, float]:
    """The metrics of the trial's final numbered checkpoint (its succeeded evaluations)."""
    numbered = [c for c in trial.checkpoints if NUMBERED.search(c.path)]
    if not numbered:
        return {}
    final = max(numbered, key=lambda c: (c.epoch, c.step))
    metrics: dict[str, float] = {}
    for evaluation in session.scalars(
        select(Evaluation).where(Evaluation.checkpoint_id == final.id, Evaluation.status == Status.SUCCEEDED.value)
    ):
        metrics.update({k: float(v) for k, v in evaluation.metrics.items()})
    return metrics


def pending_evaluations(session: Session, trial_ids: list[uuid.UUID]) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Evaluation)
            .where(Evaluation.run_id.in_(trial_ids), Evaluation.status.not_in(TERMINAL_VALUES))
        )
        or 0
    )


def experiment_of(session: Session, sweep: Sweep) -> Experiment:
    found = session.get(Experiment, sweep.experiment_id)
    assert found is not None
    return found


def report_rows(session: Session, sweep: Sweep) -> list[Any]:
    """The report's input: per (arm, seed) its latest trial's status, final metrics and cost."""
    from orchestrator.sweeps.report import TrialRow

    cost = sweep_cost(session, sweep)
    return [
        TrialRow(
            arm=trial.arm or "",
            seed=int(trial.seed or 0),
            status=trial.status,
            run_id=str(trial.id),
            metrics=final_metrics(session, trial),
            accelerator_seconds=cost.get(trial.id, 0.0),
            collapsed=collapse_reason(trial.progress),
        )
        for trial in trials_of(session, sweep)
    ]


def report_for(session: Session, sweep: Sweep) -> Any:
    """The sweep's report as it stands (partial while trials or their evaluations run): the paired statistics
    of an ablation, or the ranked trials of a search."""
    from orchestrator.sweeps.report import ablation_report

    spec = SweepSpec.model_validate(sweep.spec)
    if spec.search is not None:
        return search_report(session, sweep, spec)
    return ablation_report(spec, str(sweep.id), report_rows(session, sweep), [arm.name for arm in sweep.arms])


def search_report(session: Session, sweep: Sweep, spec: SweepSpec) -> Any:
    from orchestrator.sweeps.search_report import SearchReport, SearchRow

    assert spec.search is not None
    cost = sweep_cost(session, sweep)
    params = {arm.name: dict(arm.overrides.get("params", {})) for arm in sweep.arms}
    rows = [
        SearchRow(
            trial=trial.arm or "",
            run_id=str(trial.id),
            status=trial.status,
            reason=trial.status_reason if trial.status != Status.SUCCEEDED.value else None,
            params=params.get(trial.arm or "", {}),
            history=[(int(e), float(v)) for e, v in trial.progress.get("search", {}).get("history") or []],
            accelerator_seconds=cost.get(trial.id, 0.0),
        )
        for trial in trials_of(session, sweep)
    ]
    search = search_of(session, sweep)
    base = resolve_config(RunCreate.model_validate({"preset": spec.base.preset, "overrides": spec.base.overrides}))
    return SearchReport(
        sweep=sweep.name,
        sweep_id=str(sweep.id),
        metric=spec.metrics.primary,
        direction=spec.metrics.direction,
        epochs=base.optim.epochs,
        search_status=search.status if search is not None else "none",
        rows=rows,
        budget_hours=spec.budget.accelerator_hours,
    )


#: The curves of an ablation: a training metric every trial logs to MLflow.
CURVE_METRIC = "train/loss"


def training_curves(session: Session, sweep: Sweep, mlflow: Any) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """Per arm, per seed: the trial's training loss by step, from its MLflow run."""
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    if mlflow is None:
        return curves
    for trial in trials_of(session, sweep):
        if trial.mlflow_run_id:
            history = mlflow.metric_history(trial.mlflow_run_id, CURVE_METRIC)
            if history:
                curves.setdefault(trial.arm or "", {})[int(trial.seed or 0)] = history
    return curves


def knob_of(spec: SweepSpec) -> tuple[str, dict[str, float]] | None:
    """The one numeric config key every arm sets (a grid or zip over one knob), for plots against it."""
    values: dict[str, float] = {}
    keys = set()
    for arm in spec.arm_list:
        if len(arm.overrides) != 1:
            return None
        key, _, raw = arm.overrides[0].partition("=")
        keys.add(key)
        try:
            values[arm.name] = float(raw)
        except ValueError:
            return None
    return (keys.pop(), values) if len(keys) == 1 and values else None


PLOTS = {"ablation": ("metric", "differences", "curves"), "search": ("curves",)}


def report_plots(session: Session, sweep: Sweep, report: Any, mlflow: Any) -> dict[str, Any]:
    """The report's plots by name, each a function of the format (png or svg): metric (mean and CI per arm,
    against the knob when there is one), differences (vs the baseline), curves (training, per arm; for a
    search, every trial's objective by epoch)."""
    from orchestrator.sweeps.plots import curves_plot, differences_plot, metric_plot
    from orchestrator.sweeps.search_report import SearchReport

    if isinstance(report, SearchReport):
        return {"curves": lambda fmt: curves_plot(report.curves(), report.metric, fmt, x_label="epoch")}
    knob = knob_of(SweepSpec.model_validate(sweep.spec))
    curves = training_curves(session, sweep, mlflow)
    return {
        "metric": lambda fmt: metric_plot(
            report.primary, fmt, knob=knob[1] if knob else None, knob_name=knob[0] if knob else "knob"
        ),
        "differences": lambda fmt: differences_plot(report.primary, fmt),
        "curves": lambda fmt: curves_plot(curves, CURVE_METRIC, fmt),
    }


def plan_sweep(session: Session, settings: Settings, spec: SweepSpec, render: Any, extend: bool) -> Any:
    """What `create_sweep` would do, without writing anything: the trials, one rendered submission, the cost."""
    from orchestrator.sweeps.cost import estimate
    from orchestrator.sweeps.public import PlannedTrial, SweepPlan

    existing = session.scalar(select(Sweep).where(Sweep.name == spec.name))
    exists = "no"
    if existing is not None:
        old = SweepSpec.model_validate(existing.spec)
        exists = "same" if existing.spec_hash == spec.spec_hash() else "conflict"
        if exists == "conflict" and extend and extension_of(old, spec) is None:
            exists = "extension"
    if spec.search is not None:
        return _plan_search(settings, spec, render, exists)
    accelerators = spec.resources.nodes * spec.resources.gpus_per_node
    trials, assumption = [], ""
    for trial in plan(spec):
        cfg = resolve_config(trial_request(spec, trial))
        cost = estimate(cfg, accelerators)
        assumption = cost.assumption
        trials.append(
            PlannedTrial(
                arm=trial.arm,
                seed=trial.seed,
                config_hash=cfg.config_hash(),
                overrides=trial.overrides,
                hours=cost.hours,
                accelerator_hours=cost.accelerator_hours,
            )
        )
    return SweepPlan(
        name=spec.name,
        spec_hash=spec.spec_hash(),
        exists=exists,
        trials=trials,
        rendered=str(render(spec)),
        estimate_hours=sum(t.hours for t in trials),
        estimate_accelerator_hours=sum(t.accelerator_hours for t in trials),
        assumption=assumption,
    )


def last_objective(trial: Run) -> float | None:
    """A search trial's latest reported objective (its value at the epoch it stopped or ended)."""
    history = trial.progress.get("search", {}).get("history") or []
    return float(history[-1][1]) if history else None


def search_public(search: Any) -> Any:
    from orchestrator.schemas import AttemptPublic
    from orchestrator.sweeps.public import SearchPublic

    return SearchPublic(
        id=search.id,
        sweep_id=search.sweep_id,
        status=search.status,
        status_reason=search.status_reason,
        launcher=search.launcher,
        requeues=search.requeues,
        created_at=search.created_at,
        started_at=search.started_at,
        ended_at=search.ended_at,
        attempts=[AttemptPublic.model_validate(a, from_attributes=True) for a in search.attempts],
    )


def _plan_search(settings: Settings, spec: SweepSpec, render: Any, exists: str) -> Any:
    """A search's dry run: its space and sampler, the driver job's submission, the cost if no trial stops early."""
    from orchestrator.sweeps.cost import estimate
    from orchestrator.sweeps.public import SweepPlan

    assert spec.search is not None
    validate_search(spec)
    search = spec.search
    base = resolve_config(RunCreate.model_validate({"preset": spec.base.preset, "overrides": spec.base.overrides}))
    cost = estimate(base, search.trial_gpus)
    grid = 1
    for dimension in search.space.values():
        grid *= len(dimension.grid) if dimension.grid is not None else 1
    trials = search.num_samples * grid
    space = ", ".join(f"{key} ~ {dim.form}{list(getattr(dim, dim.form))}" for key, dim in search.space.items())
    scheduler = (
        f"ASHA (grace {search.asha.grace_period}, reduction {search.asha.reduction_factor:g}, max {base.optim.epochs})"
        if search.scheduler == "asha"
        else "FIFO (no early stopping)"
    )
    text = (
        f"search: {trials} trials ({search.algorithm} sampler, seed {search.seed}) of {space}; {scheduler}; "
        f"objective {spec.metrics.primary} ({spec.metrics.direction}) every epoch; up to {spec.max_concurrent} at once"
    )
    return SweepPlan(
        name=spec.name,
        spec_hash=spec.spec_hash(),
        exists=exists,
        trials=[],
        search=text,
        rendered=str(render(spec)),
        estimate_hours=trials * cost.hours,
        estimate_accelerator_hours=trials * cost.accelerator_hours,
        assumption=cost.assumption,
    )


def sweep_public(session: Session, sweep: Sweep, mlflow: Any) -> Any:
    from orchestrator.sweeps.public import SweepPublic, TrialCell

    spec = SweepSpec.model_validate(sweep.spec)
    cost = sweep_cost(session, sweep)
    cells: list[TrialCell] = []
    counts: defaultdict[str, int] = defaultdict(int)
    for trial in trials_of(session, sweep):
        counts[trial.status] += 1
        metrics = final_metrics(session, trial) if trial.status == Status.SUCCEEDED.value else {}
        objective = last_objective(trial) if spec.search is not None else None
        if spec.search is not None:
            metrics = {spec.metrics.primary: objective} if objective is not None else {}
        cells.append(
            TrialCell(
                arm=trial.arm or "",
                seed=int(trial.seed or 0),
                run_id=trial.id,
                status=trial.status,
                primary=metrics.get(spec.metrics.primary),
                accelerator_hours=cost.get(trial.id, 0.0) / 3600,
            )
        )
    search = search_of(session, sweep)
    return SweepPublic(
        search=search_public(search) if search is not None else None,
        plots=list(PLOTS["search" if spec.search is not None else "ablation"]),
        id=sweep.id,
        name=sweep.name,
        status=sweep.status,
        status_reason=sweep.status_reason,
        spec_hash=sweep.spec_hash,
        spec=sweep.spec,
        experiment=experiment_of(session, sweep).name,
        arms=[arm.name for arm in sweep.arms],
        seeds=spec.seed_list,
        baseline=spec.baseline_arm,
        primary_metric=spec.metrics.primary,
        counts=dict(counts),
        trials=cells,
        accelerator_hours=sum(cost.values()) / 3600,
        budget_hours=spec.budget.accelerator_hours,
        mlflow_run_id=sweep.mlflow_run_id,
        mlflow_url=mlflow.run_url(sweep.mlflow_experiment_id, sweep.mlflow_run_id) if mlflow else None,
        created_by=sweep.created_by,
        created_at=sweep.created_at,
        ended_at=sweep.ended_at,
    )
