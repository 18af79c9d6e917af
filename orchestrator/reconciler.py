"""The reconciler: drives every active run from the database and the schedulers, nothing held in memory.

Each pass launches queued runs (within launcher capacity), polls the jobs of active runs, applies the
lifecycle transitions, records checkpoints the jobs left behind, requeues preempted or lost jobs up to
`max_requeues`, and stops the jobs of runs cancelled meanwhile. A restarted service resumes from the
same state, because that state is SQL rows, scheduler job ids and files in the run folders.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select

from orchestrator.db.models import Attempt, Evaluation, Run, utcnow
from orchestrator.db.session import Database
from orchestrator.evaluations import ACTIVE, EvalJob, eval_dir, plan_final
from orchestrator.launchers import Launchers
from orchestrator.launchers.base import JobSpec, JobState, JobStatus, LauncherError, Resources
from orchestrator.lifecycle import TERMINAL, RunStatus, path_to
from orchestrator.mlflow_bridge import MlflowBridge
from orchestrator.service import get_run, record_checkpoint, record_event, run_token, transition
from orchestrator.settings import Settings
from orchestrator.worker import JobFile, read_result, train_dir

log = logging.getLogger("orchestrator.reconciler")
ACTOR = "reconciler"
WAITING = (RunStatus.SUBMITTED, RunStatus.REQUEUED, RunStatus.RUNNING, RunStatus.PREEMPTED)


@dataclass
class PassStats:
    runs: int = 0
    launched: int = 0
    settled: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def advance(session: Any, run: Run, target: RunStatus, reason: str | None, **data: Any) -> None:
    """Walk the allowed transitions to `target`, logging each (a poll can miss intermediate states)."""
    for step in path_to(RunStatus(run.status), target):
        transition(session, run, step, ACTOR, reason if step == target else f"(passed through) {reason or ''}", **data)


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        launchers: Launchers | None = None,
        mlflow: MlflowBridge | None = None,
    ) -> None:
        self.settings, self.db = settings, db
        self.launchers = launchers or Launchers(settings)
        self.mlflow = mlflow

    # ------------------------------------------------------------------ loop

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                stats = self.reconcile_once()
                if stats.errors:
                    log.warning("reconcile pass: %s", "; ".join(stats.errors[:5]))
            except Exception:
                log.exception("reconcile pass failed")
            stop.wait(self.settings.reconcile_interval_s)

    def reconcile_once(self) -> PassStats:
        started = time.perf_counter()
        stats = PassStats()
        with self.db.transaction() as session:
            unfinished = select(Attempt.run_id).where(Attempt.state != "ended")
            rows = session.execute(
                select(Run.id, Run.status, Run.launcher)
                .where(or_(Run.status.not_in([s.value for s in TERMINAL]), Run.id.in_(unfinished)))
                .order_by(Run.created_at)
            ).all()
            job_ids: dict[str, list[str]] = {}
            latest: dict[uuid.UUID, tuple[str, str | None]] = {}  # run -> (attempt state, job id)
            active = [row[0] for row in rows]
            for start in range(0, len(active), 500):
                for run_id, state, backend, job_id in session.execute(
                    select(Attempt.run_id, Attempt.state, Attempt.backend, Attempt.backend_job_id)
                    .where(Attempt.run_id.in_(active[start : start + 500]))
                    .order_by(Attempt.number)
                ):
                    latest[run_id] = (state, job_id)
                    if state != "ended" and job_id is not None:
                        job_ids.setdefault(backend, []).append(str(job_id))
        polls: dict[str, JobStatus] = {}
        for backend, ids in job_ids.items():
            try:
                polls.update(self.launchers.get(backend).poll_many(ids))
            except LauncherError as exc:
                stats.errors.append(f"{backend}: {exc}")
        capacity: dict[str, int | None] = {}
        stats.runs = len(rows)
        for run_id, status, launcher in rows:
            try:
                if status == RunStatus.QUEUED.value:
                    if launcher not in capacity:
                        capacity[launcher] = self.launchers.get(launcher).capacity()
                    free = capacity[launcher]
                    if free is not None and free <= 0:
                        continue
                    if self._launch(run_id):
                        stats.launched += 1
                        if free is not None:
                            capacity[launcher] = free - 1
                elif self._may_change(RunStatus(status), latest.get(run_id), polls):
                    stats.settled += self._follow(run_id, polls)
            except Exception as exc:  # one bad run must not stop the others
                log.exception("run %s", run_id)
                stats.errors.append(f"{run_id}: {exc}")
        self._evaluations_pass(stats)
        stats.seconds = time.perf_counter() - started
        return stats

    # ------------------------------------------------------------------ launching

    def _ensure_mlflow(self, run: Run) -> None:
        if self.mlflow is None or run.mlflow_run_id:
            return
        experiment_id = self.mlflow.experiment_id(run.experiment.name)
        tags = {
            "orch.run_id": str(run.id),
            "orch.config_hash": run.config_hash,
            "orch.launcher": run.launcher,
            "method": run.method,
        }
        run.mlflow_experiment_id = experiment_id
        run.mlflow_run_id = self.mlflow.create_run(experiment_id, run.name, tags)
        run.experiment.mlflow_experiment_id = experiment_id

    def _launch(self, run_id: uuid.UUID, requeue_reason: str | None = None) -> bool:
        """Create the next attempt, commit it, then submit (submission is idempotent on the attempt key)."""
        with self.db.transaction() as session:
            run = get_run(session, run_id, lock=True)
            status = RunStatus(run.status)
            if status not in (RunStatus.QUEUED, RunStatus.REQUEUED):
                return False
            self._ensure_mlflow(run)
            run_dir = Path(run.output_dir).parent
            run_dir.mkdir(parents=True, exist_ok=True)
            JobFile(
                run_id=str(run.id),
                config=run.config,
                api_url=self.settings.api_url,
                token=run_token(self.settings.secret, run.id),
                mlflow_tracking_uri=self.mlflow.tracking_uri if self.mlflow else self.settings.tracking_uri,
                mlflow_run_id=run.mlflow_run_id,
                backend=run.launcher,
            ).write(run_dir)
            last = run.attempts[-1] if run.attempts else None
            if last is not None and last.state == "submitting":
                attempt = last  # crashed between commit and submit last time: submit the same key again
            else:
                resources = run.resources
                attempt = Attempt(
                    run=run,
                    number=(last.number + 1) if last else 1,
                    backend=run.launcher,
                    state="submitting",
                    accelerators=int(resources.get("nodes", 1)) * int(resources.get("gpus_per_node", 0)),
                )
                session.add(attempt)
            session.flush()
            from orchestrator.service import job_spec

            spec = job_spec(run, attempt.number, self.settings.python)
            attempt.log_path = str(spec.log_dir / f"attempt-{attempt.number}.log")
            number = attempt.number
        launcher = self.launchers.get(run.launcher)
        try:
            job_id = launcher.submit(spec)
            error = None
        except LauncherError as exc:
            job_id, error = None, str(exc)
        with self.db.transaction() as session:
            run = get_run(session, run_id, lock=True)
            attempt = next(a for a in run.attempts if a.number == number)
            if error is not None:
                attempt.state, attempt.ended_at, attempt.exit_reason = "ended", utcnow(), f"submission failed: {error}"
                if not RunStatus(run.status).terminal:
                    advance(session, run, RunStatus.FAILED, f"submission failed: {error}")
                    self._finish_mlflow(run)
                return False
            attempt.backend_job_id, attempt.state = job_id, "pending"
            record_event(session, run, "attempt", ACTOR, "submitted", number=number, job_id=job_id)
            if RunStatus(run.status) == RunStatus.QUEUED:
                transition(session, run, RunStatus.SUBMITTED, ACTOR, f"{run.launcher} job {job_id}")
            elif RunStatus(run.status).terminal:  # cancelled while we were submitting
                launcher.cancel(str(job_id))
        return True

    # ------------------------------------------------------------------ following

    @staticmethod
    def _may_change(status: RunStatus, attempt: tuple[str, str | None] | None, polls: dict[str, JobStatus]) -> bool:
        """Skip the locking transaction for the common pass where nothing can change: a job still queued
        by its scheduler for a run already marked submitted or requeued."""
        if attempt is None:
            return False
        state, job_id = attempt
        if state != "pending" or job_id is None or job_id not in polls:
            return True
        return not (polls[job_id].state == JobState.PENDING and status in (RunStatus.SUBMITTED, RunStatus.REQUEUED))

    def _follow(self, run_id: uuid.UUID, polls: dict[str, JobStatus]) -> int:
        with self.db.transaction() as session:
            run = get_run(session, run_id, lock=True)
            attempt = run.attempts[-1] if run.attempts else None
            status = RunStatus(run.status)
            if attempt is None:
                return 0
            if attempt.state == "submitting":
                if status.terminal:
                    attempt.state = "ended"
                    return 0
                relaunch = True
            else:  # a requeued run whose previous attempt is settled waits for its next attempt
                relaunch = status == RunStatus.REQUEUED and attempt.state == "ended"
        if relaunch:
            self._launch(run_id)
            return 0
        assert attempt.backend_job_id is not None
        job = polls.get(attempt.backend_job_id)
        if job is None:
            return 0
        launcher = self.launchers.get(attempt.backend)
        with self.db.transaction() as session:
            run = get_run(session, run_id, lock=True)
            attempt = run.attempts[-1]
            status = RunStatus(run.status)
            if status.terminal:  # cancelled (or settled) while the job still runs: stop it, then close the attempt
                if not job.state.ended:
                    launcher.cancel(str(attempt.backend_job_id))
                    return 0
                self._close_attempt(attempt, job)
                self._ingest_checkpoints(session, run, attempt.number)
                return 1
            if job.state == JobState.PENDING:
                if status == RunStatus.RUNNING:  # the scheduler put it back in the queue (SLURM requeue)
                    advance(session, run, RunStatus.REQUEUED, job.reason or "scheduler requeued the job")
                return 0
            if job.state == JobState.RUNNING:
                attempt.state = "running"
                attempt.host = attempt.host or job.host
                attempt.started_at = attempt.started_at or job.started_at or utcnow()
                if status in (RunStatus.SUBMITTED, RunStatus.REQUEUED, RunStatus.PREEMPTED):
                    advance(session, run, RunStatus.RUNNING, f"running on {job.host or 'its node'}")
                self._check_heartbeat(session, run, attempt, job, launcher)
                self._ingest_checkpoints(session, run, attempt.number)
                return 0
            # the job has ended: settle the attempt from its result file, whatever the reports said
            self._settle(session, run, attempt, job)
            requeued = RunStatus(run.status) == RunStatus.REQUEUED
        if requeued:
            self._launch(run_id)
        return 1

    def _check_heartbeat(self, session: Any, run: Run, attempt: Attempt, job: JobStatus, launcher: Any) -> None:
        """A job the scheduler calls running but that has said nothing for too long is hung: stop it (it is
        then settled like a lost job). Measured from its latest sign of life, a (re)start included."""
        timeout = timedelta(seconds=self.settings.heartbeat_timeout_s)
        signs = [t for t in (run.last_heartbeat_at, attempt.started_at, job.started_at) if t is not None]
        last = max(signs) if signs else None
        if last is not None and utcnow() - last > timeout:
            record_event(session, run, "lost", ACTOR, f"no heartbeat for {timeout}; stopping the job to requeue it")
            launcher.cancel(str(attempt.backend_job_id))

    def _close_attempt(self, attempt: Attempt, job: JobStatus) -> None:
        attempt.state = "ended"
        attempt.ended_at = job.ended_at or utcnow()
        attempt.exit_code = job.exit_code
        attempt.exit_reason = attempt.exit_reason or job.reason or job.state.value
        attempt.host = attempt.host or job.host
        if attempt.started_at is None and job.started_at is not None:
            attempt.started_at = job.started_at
        if attempt.started_at is not None:
            seconds = max((attempt.ended_at - attempt.started_at).total_seconds(), 0.0)
            attempt.accelerator_seconds = seconds * attempt.accelerators

    def _ingest_checkpoints(self, session: Any, run: Run, attempt: int) -> None:
        """Checkpoints the trainer logged (catches up on reports lost while the service was down)."""
        log_file = Path(run.output_dir) / "log.jsonl"
        if not log_file.exists():
            return
        known = {(c.path, c.sha256) for c in run.checkpoints}
        for line in log_file.read_text().splitlines():
            if '"checkpoint"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if record.get("event") != "checkpoint" or not record.get("sha256"):
                continue
            if (record["path"], record["sha256"]) in known:
                continue
            record_checkpoint(
                session,
                self.settings,
                run,
                attempt=attempt,
                path=record["path"],
                epoch=int(record["epoch"]),
                step=int(record["iteration"]),
                sha256=record["sha256"],
                kind=record.get("kind", "epoch"),
                actor=ACTOR,
            )
            known.add((record["path"], record["sha256"]))

    def _settle(self, session: Any, run: Run, attempt: Attempt, job: JobStatus) -> None:
        run_dir = Path(run.output_dir).parent
        # SLURM requeues of the same job leave result files of later attempts
        number = attempt.number
        while read_result(run_dir, number + 1) is not None:
            number += 1
            extra = Attempt(
                run=run,
                number=number,
                backend=attempt.backend,
                backend_job_id=attempt.backend_job_id,
                accelerators=attempt.accelerators,
                state="running",
                log_path=attempt.log_path,
            )
            session.add(extra)
            self._close_attempt(attempt, JobStatus(JobState.PREEMPTED, reason="requeued by the scheduler"))
            attempt = extra
        self._close_attempt(attempt, job)
        self._ingest_checkpoints(session, run, attempt.number)
        result = read_result(run_dir, attempt.number)
        outcome = result.get("status") if result else None
        if outcome == "completed" and job.state == JobState.COMPLETED:
            final = Path(result.get("checkpoint") or train_dir(run_dir) / "checkpoint.pth") if result else None
            if final is None or not final.exists():
                advance(session, run, RunStatus.FAILED, "job reported completion but its final checkpoint is missing")
            else:
                run.progress = {**run.progress, "iteration": result.get("iteration") if result else None}
                advance(session, run, RunStatus.SUCCEEDED, "training completed")
                if run.experiment.eval_policy.get("benchmarks"):
                    plan_final(session, self.settings, run)
        elif outcome == "interrupted" or (job.state in (JobState.PREEMPTED, JobState.LOST) and outcome != "failed"):
            why = (result or {}).get("reason") or job.reason or job.state.value
            attempt.exit_reason = why
            if run.requeues < self.settings.max_requeues:
                advance(session, run, RunStatus.PREEMPTED, why)
                run.requeues += 1
                transition(
                    session, run, RunStatus.REQUEUED, ACTOR, f"requeue {run.requeues}/{self.settings.max_requeues}"
                )
            else:
                advance(session, run, RunStatus.FAILED, f"{why}; gave up after {run.requeues} requeues")
        else:
            why = (result or {}).get("reason") or job.reason or f"job {job.state.value}"
            if result is None and job.state == JobState.COMPLETED:
                why = "job exited 0 without a result file"
            advance(session, run, RunStatus.FAILED, why)
        if RunStatus(run.status).terminal:
            self._finish_mlflow(run)

    def _finish_mlflow(self, run: Run) -> None:
        if self.mlflow is not None and run.mlflow_run_id:
            try:
                self.mlflow.terminate(run.mlflow_run_id, RunStatus(run.status))
            except Exception as exc:  # MLflow is the view, SQL the truth: never fail a transition on it
                log.warning("MLflow status of run %s not updated: %s", run.id, exc)

    # ------------------------------------------------------------------ evaluations

    def _evaluations_pass(self, stats: PassStats) -> None:
        """Launch queued evaluations on their own launcher queue, follow the others, retry failures."""
        with self.db.transaction() as session:
            rows = session.execute(
                select(Evaluation.id, Evaluation.status, Evaluation.launcher, Evaluation.backend_job_id)
                .where(Evaluation.status.in_([*ACTIVE, "submitting"]))
                .order_by(Evaluation.created_at)
            ).all()
        jobs: dict[str, list[str]] = {}
        for _, status, launcher, job_id in rows:
            if status in ("submitted", "running") and job_id:
                jobs.setdefault(launcher, []).append(job_id)
        polls: dict[str, JobStatus] = {}
        for backend, ids in jobs.items():
            try:
                polls.update(self.launchers.get(backend, queue="eval").poll_many(ids))
            except LauncherError as exc:
                stats.errors.append(f"{backend} (evaluations): {exc}")
        capacity: dict[str, int | None] = {}
        for evaluation_id, status, launcher, job_id in rows:
            try:
                if status in ("queued", "submitting"):
                    if launcher not in capacity:
                        capacity[launcher] = self.launchers.get(launcher, queue="eval").capacity()
                    free = capacity[launcher]
                    if free is not None and free <= 0 and status == "queued":
                        continue
                    if self._launch_evaluation(evaluation_id) and free is not None:
                        capacity[launcher] = free - 1
                elif job_id and job_id in polls:
                    self._follow_evaluation(evaluation_id, polls[job_id])
            except Exception as exc:
                log.exception("evaluation %s", evaluation_id)
                stats.errors.append(f"evaluation {evaluation_id}: {exc}")

    def _launch_evaluation(self, evaluation_id: uuid.UUID) -> bool:
        with self.db.transaction() as session:
            evaluation = session.get(Evaluation, evaluation_id, with_for_update=True)
            if evaluation is None or evaluation.status not in ("queued", "submitting"):
                return False
            if evaluation.status == "queued":  # a new attempt; "submitting" repeats a crashed submission
                evaluation.attempts += 1
                evaluation.status = "submitting"
            run = get_run(session, evaluation.run_id)
            folder = eval_dir(self.settings, evaluation)
            EvalJob(
                evaluation_id=str(evaluation.id),
                run_id=str(run.id),
                benchmark=evaluation.benchmark,
                config=evaluation.config,
                dataset=evaluation.dataset,
                checkpoint=evaluation.checkpoint.path,
                checkpoint_sha256=evaluation.checkpoint_sha256,
                checkpoint_step=evaluation.checkpoint.step,
                cache_dir=str(self.settings.home.resolve() / "feature-cache"),
                mlflow_tracking_uri=self.mlflow.tracking_uri if self.mlflow else self.settings.tracking_uri,
                mlflow_experiment_id=run.mlflow_experiment_id,
                mlflow_parent_run_id=run.mlflow_run_id,
            ).write(folder)
            attempt = evaluation.attempts
            spec = JobSpec(
                run_id=str(evaluation.id),
                attempt=attempt,
                name=f"orch-eval-{evaluation.benchmark}-{str(evaluation.id)[:8]}",
                argv=[self.settings.python, "-m", "orchestrator.eval_worker", str(folder), "--attempt", str(attempt)],
                workdir=folder,
                resources=Resources.model_validate(evaluation.resources),
            )
            launcher_name = evaluation.launcher
        launcher = self.launchers.get(launcher_name, queue="eval")
        try:
            job_id, error = launcher.submit(spec), None
        except LauncherError as exc:
            job_id, error = None, str(exc)
        with self.db.transaction() as session:
            evaluation = session.get(Evaluation, evaluation_id, with_for_update=True)
            assert evaluation is not None
            if error is not None:
                evaluation.status, evaluation.error, evaluation.ended_at = (
                    "failed",
                    f"submission failed: {error}",
                    utcnow(),
                )
                return False
            evaluation.status, evaluation.backend_job_id = "submitted", job_id
        return True

    def _follow_evaluation(self, evaluation_id: uuid.UUID, job: JobStatus) -> None:
        with self.db.transaction() as session:
            evaluation = session.get(Evaluation, evaluation_id, with_for_update=True)
            if evaluation is None or evaluation.status not in ("submitted", "running"):
                return
            if job.state == JobState.RUNNING:
                evaluation.status = "running"
                evaluation.started_at = evaluation.started_at or job.started_at or utcnow()
                return
            if not job.state.ended:
                return
            result = read_result(eval_dir(self.settings, evaluation), evaluation.attempts) or {}
            run = get_run(session, evaluation.run_id)
            evaluation.started_at = evaluation.started_at or job.started_at
            if result.get("status") == "completed" and job.state == JobState.COMPLETED:
                evaluation.status, evaluation.error = "succeeded", None
                evaluation.metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
                evaluation.seconds = result.get("seconds")
                evaluation.mlflow_run_id = result.get("mlflow_run_id")
                evaluation.ended_at = utcnow()
                record_event(
                    session,
                    run,
                    "evaluation",
                    ACTOR,
                    f"{evaluation.benchmark} succeeded",
                    evaluation_id=str(evaluation.id),
                    metrics=evaluation.metrics,
                )
                return
            error = result.get("error") or job.reason or f"job {job.state.value}"
            evaluation.error = error
            evaluation.mlflow_run_id = result.get("mlflow_run_id") or evaluation.mlflow_run_id
            if evaluation.attempts < evaluation.max_attempts:
                evaluation.status, evaluation.backend_job_id = "queued", None  # retried on the next pass
                record_event(
                    session,
                    run,
                    "evaluation",
                    ACTOR,
                    f"{evaluation.benchmark} attempt {evaluation.attempts} failed, retrying: {error}",
                    evaluation_id=str(evaluation.id),
                )
            else:
                evaluation.status, evaluation.ended_at = "failed", utcnow()
                record_event(
                    session,
                    run,
                    "evaluation",
                    ACTOR,
                    f"{evaluation.benchmark} failed: {error}",
                    evaluation_id=str(evaluation.id),
                )
