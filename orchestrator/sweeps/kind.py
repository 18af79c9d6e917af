"""The service side of trials: a pretraining run with its sweep's concurrency cap, budget, MLflow parent and
close-out (the sweep completes when its trials and their evaluations have ended; its report is then logged
to the sweep's MLflow run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.db.models import Job, Run, Sweep, Trial, utcnow
from orchestrator.db.session import Database
from orchestrator.jobs.kinds import Context
from orchestrator.jobs.records import cancel, transition
from orchestrator.launchers.tune import close_mailbox
from orchestrator.lifecycle import Status
from orchestrator.runs import TrainKind
from orchestrator.sweeps.search import read_search_metrics, search_metrics_file, search_of
from orchestrator.sweeps.service import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    TERMINAL_VALUES,
    experiment_of,
    pending_evaluations,
    report_for,
    report_plots,
    sweep_cost,
    sweep_event,
)
from orchestrator.sweeps.spec import SweepSpec

log = logging.getLogger("orchestrator.sweeps")
RUNNING_VALUES = (Status.SUBMITTED.value, Status.RUNNING.value, Status.PREEMPTED.value, Status.REQUEUED.value)


class TrialKind(TrainKind):
    def may_launch(self, ctx: Context, session: Session, job: Job) -> str | None:
        assert isinstance(job, Trial)
        sweep = session.get(Sweep, job.sweep_id, with_for_update=True)
        if sweep is None:
            return None
        spec = SweepSpec.model_validate(sweep.spec)
        if sweep.status == CANCELLED:
            transition(session, job, Status.CANCELLED, "sweep", f"sweep {sweep.name} cancelled")
            return "sweep cancelled"
        spent = _budget_spent(session, sweep, spec)
        if spent is not None:
            transition(session, job, Status.CANCELLED, "sweep", spent)
            return spent
        if job.launcher == "tune":
            return None  # its search's Tune runs at most max_concurrent trials
        running = _running(session, sweep, but=job)
        if running >= spec.max_concurrent:
            return f"waiting: {running} trials running (max_concurrent {spec.max_concurrent})"
        return None

    def array_group(self, ctx: Context, session: Session, job: Job) -> tuple[str, int] | None:
        """A sweep's queued trials with the same resources go out together, as many at once as its cap
        leaves free (SLURM enforces it with `--array=...%P`)."""
        assert isinstance(job, Trial)
        sweep = session.get(Sweep, job.sweep_id)
        if sweep is None:
            return None
        spec = SweepSpec.model_validate(sweep.spec)
        resources = json.dumps(job.resources, sort_keys=True)
        return f"{sweep.id}:{resources}", max(1, spec.max_concurrent - _running(session, sweep))

    def has_news(self, ctx: Context, folder: str, launcher: str) -> bool:
        news = super().has_news(ctx, folder, launcher)
        return (launcher == "tune" and ctx.tails.changed(search_metrics_file(Path(folder)))) or news

    def running(self, ctx: Context, session: Session, job: Job, attempt: int) -> None:
        super().running(ctx, session, job, attempt)
        if job.launcher == "tune":
            assert isinstance(job, Trial)
            history = read_search_metrics(Path(job.folder))
            ctx.tails.seen_on_commit(session, search_metrics_file(Path(job.folder)))
            if history:
                job.progress = {**job.progress, "search": {"history": history, "epoch": history[-1][0]}}

    def terminal(self, session: Session, job: Job, actor: str) -> None:
        super().terminal(session, job, actor)
        if job.launcher == "tune":  # its trainable may wait for a launch that will not come: tell it
            close_mailbox(Path(job.folder), job.status, job.status_reason)

    def mlflow_tags(self, ctx: Context, session: Session, run: Run, experiment_id: str) -> dict[str, str]:
        assert ctx.mlflow is not None
        sweep = session.get(Sweep, run.sweep_id, with_for_update=True)
        if sweep is None:
            return {}
        if not sweep.mlflow_run_id:  # the parent run, made with the first trial that launches
            tags = {"orch.sweep_id": str(sweep.id), "orch.spec_hash": sweep.spec_hash, "orch.kind": "sweep"}
            sweep.mlflow_experiment_id = experiment_id
            sweep.mlflow_run_id = ctx.mlflow.create_run(experiment_id, f"sweep/{sweep.name}", tags)
        return {
            "mlflow.parentRunId": sweep.mlflow_run_id,
            "orch.sweep_id": str(sweep.id),
            "orch.arm": run.arm or "",
            "orch.seed": str(run.seed),
        }

    def housekeeping(self, ctx: Context, db: Database) -> list[str]:
        """Close sweeps whose trials and evaluations have all ended; log each one's report once."""
        errors: list[str] = []
        with db.sessions() as session:
            active = session.scalars(select(Sweep.id).where(Sweep.status == ACTIVE)).all()
            unlogged = session.scalars(
                select(Sweep.id).where(Sweep.status != ACTIVE, Sweep.report_logged.is_(False))
            ).all()
        for sweep_id in active:
            with db.transaction() as session:
                sweep = session.get(Sweep, sweep_id, with_for_update=True)
                if sweep is None or sweep.status != ACTIVE:
                    continue
                self._stop_waiting_trials_past_budget(session, sweep)
                trials = session.execute(select(Trial.id, Trial.status).where(Trial.sweep_id == sweep.id)).all()
                search = search_of(session, sweep)
                if search is not None and not Status(search.status).terminal:
                    continue  # a search registers trials until it ends
                if all(status in TERMINAL_VALUES for _, status in trials) and not pending_evaluations(
                    session, [trial for trial, _ in trials]
                ):
                    sweep.status, sweep.ended_at = COMPLETED, utcnow()
                    sweep_event(session, sweep, "completed", "reconciler", f"{len(trials)} trials ended")
                    unlogged = [*unlogged, sweep.id]
        if ctx.mlflow is not None:
            for sweep_id in unlogged:
                try:
                    self._log_report(ctx, db, sweep_id)
                except Exception as exc:  # MLflow is the view: retried next pass
                    errors.append(f"report of sweep {sweep_id} not logged to MLflow: {exc}")
        return errors

    @staticmethod
    def _stop_waiting_trials_past_budget(session: Session, sweep: Sweep) -> None:
        """Trials submitted together (a SLURM array) wait in the scheduler: past the budget, cancel those
        that have not started; running ones finish."""
        spent = _budget_spent(session, sweep, SweepSpec.model_validate(sweep.spec))
        if spent is None:
            return
        waiting = session.scalars(
            select(Trial).where(Trial.sweep_id == sweep.id, Trial.status.in_((Status.SUBMITTED.value,)))
        )
        for trial in waiting:
            cancel(session, trial, "sweep", spent)

    @staticmethod
    def _log_report(ctx: Context, db: Database, sweep_id: Any) -> None:
        assert ctx.mlflow is not None
        with db.sessions() as session:
            sweep = session.get(Sweep, sweep_id)
            if sweep is None or sweep.report_logged:
                return
            report = report_for(session, sweep)
            plots = report_plots(session, sweep, report, ctx.mlflow)
            parent, status = sweep.mlflow_run_id, sweep.status
            experiment = experiment_of(session, sweep).name
        if parent:
            files: dict[str, bytes] = {
                "sweep_report.md": report.to_markdown().encode(),
                "sweep_report.json": json.dumps(report.to_json(), indent=2).encode(),
                "sweep_report.csv": report.to_csv().encode(),
            }
            for name, draw in plots.items():
                for fmt in ("png", "svg"):
                    files[f"plots/{name}.{fmt}"] = draw(fmt)
            ctx.mlflow.log_files(parent, files)
            ctx.mlflow.terminate(parent, Status.SUCCEEDED if status == COMPLETED else Status.CANCELLED)
        with db.transaction() as session:
            sweep = session.get(Sweep, sweep_id)
            if sweep is not None:
                sweep.report_logged = True
        log.info("report of sweep %s (%s) logged", sweep_id, experiment)


def _running(session: Session, sweep: Sweep, but: Job | None = None) -> int:
    """Trials holding (or waiting in the scheduler for) resources, other than `but` (a requeued trial)."""
    query = select(func.count()).select_from(Trial).where(Trial.sweep_id == sweep.id, Trial.status.in_(RUNNING_VALUES))
    if but is not None:
        query = query.where(Trial.id != but.id)
    running = session.scalar(query)
    return int(running or 0)


def _budget_spent(session: Session, sweep: Sweep, spec: SweepSpec) -> str | None:
    """Why nothing more of this sweep may start (its accelerator-hours are spent), recorded once as an event."""
    budget = spec.budget.accelerator_hours
    if budget is None:
        return None
    spent = sum(sweep_cost(session, sweep).values()) / 3600
    if spent < budget:
        return None
    why = f"sweep budget spent: {spent:.2f} of {budget:g} accelerator-hours"
    if sweep.status_reason != "sweep budget spent":
        sweep.status_reason = "sweep budget spent"
        sweep_event(session, sweep, "budget_spent", "reconciler", why, spent_hours=spent)
    return why


TRIAL = TrialKind()
