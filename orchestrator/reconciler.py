"""The reconciler: drives every active job from the database and the schedulers, nothing held in memory.

One routine for every kind of job (pretraining runs, evaluations): each pass launches queued jobs within
their launcher's capacity, polls the scheduler jobs of active ones, applies the lifecycle transitions,
closes attempts (with their accelerator-seconds), requeues preempted or lost jobs up to `max_requeues`,
retries the failures a kind retries, stops the scheduler jobs of jobs cancelled meanwhile, and mirrors
terminal states to MLflow. What differs per kind (the job file, what a completed result means, what runs
while the job runs) is the kind's `JobKind`. A restarted service resumes from the same state, because
that state is SQL rows, scheduler job ids and files in the job folders.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, or_, select
from sqlalchemy.orm import Session

from orchestrator.db.models import Attempt, Job, utcnow
from orchestrator.db.session import Database
from orchestrator.jobs.files import JobFileError, read_result
from orchestrator.jobs.kinds import KINDS, Context, handler, job_spec
from orchestrator.jobs.records import (
    advance,
    close_attempt,
    current_attempt,
    get_job,
    lock_jobs,
    record_event,
    scheduler_restart,
    transition,
)
from orchestrator.launchers import Launchers
from orchestrator.launchers.base import (
    ArrayLauncher,
    JobSpec,
    JobState,
    JobStatus,
    Launcher,
    LauncherError,
    Resources,
)
from orchestrator.leader import Lease
from orchestrator.lifecycle import TERMINAL, Status
from orchestrator.metrics import launcher_error, pass_done
from orchestrator.mlflow_bridge import MlflowBridge
from orchestrator.settings import Settings

log = logging.getLogger("orchestrator.reconciler")
ACTOR = "reconciler"
#: How an attempt the reconciler stopped for silence is marked, so its end is settled as lost, not cancelled.
NO_HEARTBEAT = "lost: no heartbeat for"
#: Jobs whose row locks one transaction takes together.
FOLLOW_BATCH = 100
ACTIVE = [s.value for s in Status if not s.terminal]
JOBS = cast(Table, Job.__table__)
OPEN_ATTEMPTS = ["submitting", "pending", "running"]


@dataclass
class PassStats:
    jobs: int = 0
    launched: int = 0
    settled: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Tracked:
    """What one pass knows about an active job before it takes any lock."""

    job_id: uuid.UUID
    kind: str
    status: Status
    launcher: str
    folder: str
    heartbeat_at: datetime | None = None
    attempt_state: str | None = None
    backend_job_id: str | None = None
    restarts_seen: int = 0  # earlier attempts under the same scheduler job id (scheduler-side requeues)
    attempt_host: str | None = None
    attempt_started_at: datetime | None = None

    @property
    def queue(self) -> str:
        return KINDS[self.kind].queue


@dataclass(frozen=True)
class Prepared:
    """An attempt written down (state "submitting", job file in place) and ready to submit."""

    job_id: uuid.UUID
    attempt: int
    launcher: str
    queue: str
    spec: JobSpec


def full_disk(folder: Path, threshold: int = 4 << 20) -> str:
    """Why a job may have died without leaving its result file: its folder's filesystem is full."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; no space left on device in its folder ({free >> 10} KiB free)" if free < threshold else ""


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
        self.ctx = Context(settings, mlflow)

    # ------------------------------------------------------------------ loop

    def run_forever(self, stop: threading.Event, lease: Lease | None = None) -> None:
        """Reconcile every `reconcile_interval_s` until `stop`; with a `lease`, only while it is held (one
        active reconciler per database, see orchestrator/leader.py), asking again before every pass."""
        while not stop.is_set():
            if lease is not None and not lease.held():
                stop.wait(self.settings.reconcile_interval_s)
                continue
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
        tracked = self._tracked()
        stats.jobs = len(tracked)
        polls: dict[str, JobStatus] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for job in tracked:
            if job.attempt_state not in (None, "ended", "submitting") and job.backend_job_id is not None:
                groups.setdefault((job.launcher, job.queue), []).append(job.backend_job_id)
        for (name, queue), ids in groups.items():
            try:
                polls.update(self.launchers.get(name, queue).poll_many(ids))
            except LauncherError as exc:
                launcher_error(name, "poll")
                stats.errors.append(f"{name}: {exc}")
        arrays, in_arrays = self._arrays([job for job in tracked if job.status == Status.QUEUED])
        for members, parallelism in arrays:
            try:
                stats.launched += self._launch_array(members, parallelism)
            except Exception as exc:
                log.exception("array of %d jobs", len(members))
                stats.errors.append(f"array of {len(members)} jobs: {exc}")
        now = utcnow()
        changing = [
            job
            for job in tracked
            if job.status != Status.QUEUED and job.job_id not in in_arrays and not self._quiet(job, polls, now)
        ]
        for start in range(0, len(changing), FOLLOW_BATCH):
            self._follow_batch(changing[start : start + FOLLOW_BATCH], polls, stats)
        capacity: dict[tuple[str, str], int | None] = {}
        for job in tracked:
            if job.job_id in in_arrays or job.status != Status.QUEUED:
                continue
            try:
                key = (job.launcher, job.queue)
                if key not in capacity:
                    capacity[key] = self.launchers.get(*key).capacity()
                free = capacity[key]
                if free is not None and free <= 0:
                    continue
                if self._launch(job.job_id):
                    stats.launched += 1
                    if free is not None:
                        capacity[key] = free - 1
            except Exception as exc:  # one bad job must not stop the others
                log.exception("%s job %s", job.kind, job.job_id)
                stats.errors.append(f"{job.kind} {job.job_id}: {exc}")
        self.ctx.tails.sweep()
        self._sync_mlflow(stats)
        for name in KINDS:
            try:
                stats.errors += handler(name).housekeeping(self.ctx, self.db)
            except Exception as exc:  # one kind's bookkeeping must not stop the pass
                log.exception("housekeeping of %s", name)
                stats.errors.append(f"housekeeping of {name}: {exc}")
        stats.seconds = time.perf_counter() - started
        pass_done(self.db, stats.seconds)
        return stats

    def _tracked(self) -> list[Tracked]:
        """Active jobs and terminal jobs whose last attempt is still open, oldest first, with that attempt:
        one query, whose cost follows active work (both predicates are index lookups), not finished work."""
        open_attempts = select(Attempt.job_id).where(Attempt.state.in_(OPEN_ATTEMPTS))
        jobs = JOBS.c  # the jobs table alone: the ORM's Job would outer-join every kind's table
        with self.db.sessions() as session:
            rows = session.execute(
                select(
                    jobs.id,
                    jobs.kind,
                    jobs.status,
                    jobs.launcher,
                    jobs.folder,
                    jobs.last_heartbeat_at,
                    Attempt.state,
                    Attempt.backend_job_id,
                    Attempt.host,
                    Attempt.started_at,
                )
                .select_from(JOBS)
                .outerjoin(Attempt, Attempt.job_id == jobs.id)
                .where(or_(jobs.status.in_(ACTIVE), jobs.id.in_(open_attempts)))
                .order_by(jobs.created_at, jobs.id, Attempt.number)
            ).all()
        by_job: dict[uuid.UUID, list[Any]] = {}
        for row in rows:
            by_job.setdefault(row[0], []).append(row)
        tracked = []
        for history in by_job.values():
            job_id, kind, status, launcher, folder, heartbeat_at, state, backend_job_id, host, started_at = history[-1]
            same = 0  # earlier attempts under the same scheduler id
            for earlier in reversed(history[:-1]):
                if earlier[7] is None or earlier[7] != backend_job_id:
                    break
                same += 1
            tracked.append(
                Tracked(
                    job_id,
                    kind,
                    Status(status),
                    launcher,
                    folder,
                    heartbeat_at,
                    state,
                    backend_job_id,
                    same if state is not None else 0,
                    host,
                    started_at,
                )
            )
        return tracked

    # ------------------------------------------------------------------ launching

    def _launch(self, job_id: uuid.UUID) -> bool:
        """Create the next attempt and its job file, commit, then submit (idempotent on the attempt key)."""
        with self.db.transaction() as session:
            prepared = self._prepare(session, job_id)
        if prepared is None:
            return False
        launcher = self.launchers.get(prepared.launcher, prepared.queue)
        try:
            backend_job_id, error = launcher.submit(prepared.spec), None
        except LauncherError as exc:
            launcher_error(prepared.launcher, "submit")
            backend_job_id, error = None, str(exc)
        return self._submitted(prepared, launcher, backend_job_id, error)

    def _launch_array(self, job_ids: list[uuid.UUID], parallelism: int) -> int:
        """Queued jobs of one group (a sweep's trials on SLURM) as one array: each task stays its own job,
        with its own attempts; the array runs at most `parallelism` of them at once."""
        with self.db.transaction() as session:
            prepared = [p for job_id in job_ids if (p := self._prepare(session, job_id)) is not None]
        if not prepared:
            return 0
        launcher = self.launchers.get(prepared[0].launcher, prepared[0].queue)
        assert isinstance(launcher, ArrayLauncher)
        try:
            ids: list[str | None] = list(launcher.submit_array([p.spec for p in prepared], parallelism))
            error = None
        except LauncherError as exc:
            launcher_error(prepared[0].launcher, "submit")
            ids, error = [None] * len(prepared), str(exc)
        return sum(self._submitted(p, launcher, i, error) for p, i in zip(prepared, ids, strict=True))

    def _arrays(self, queued: list[Tracked]) -> tuple[list[tuple[list[uuid.UUID], int]], set[uuid.UUID]]:
        """Groups of queued jobs that go out as one array (their launcher takes arrays, their kind groups
        them), and the jobs in those groups."""
        candidates = [
            job
            for job in queued
            if job.status == Status.QUEUED and isinstance(self.launchers.get(job.launcher, job.queue), ArrayLauncher)
        ]
        if not candidates:
            return [], set()
        groups: dict[tuple[str, str], tuple[list[uuid.UUID], int]] = {}
        with self.db.sessions() as session:
            for job in candidates:
                group = handler(job.kind).array_group(self.ctx, session, get_job(session, Job, job.job_id, "job"))
                if group is not None:
                    key, parallelism = group
                    members, _ = groups.get((job.launcher, key), ([], parallelism))
                    groups[(job.launcher, key)] = ([*members, job.job_id], parallelism)
        arrays = [group for group in groups.values() if len(group[0]) > 1]
        return arrays, {job_id for members, _ in arrays for job_id in members}

    def _prepare(self, session: Session, job_id: uuid.UUID) -> Prepared | None:
        """The attempt to submit and its job file, or None when the job is not to be launched now."""
        job = get_job(session, Job, job_id, "job", lock=True)
        if Status(job.status) not in (Status.QUEUED, Status.REQUEUED):
            return None
        kind = handler(job.kind)
        last = current_attempt(job)
        if last is not None and last.state in ("pending", "running"):
            return None  # the scheduler holds it already (it requeued the job itself)
        if kind.may_launch(self.ctx, session, job) is not None:
            return None  # waits (a sweep's concurrency cap) or was ended (a sweep's budget)
        if last is not None and last.state == "submitting":
            attempt = last  # crashed between commit and submit last time: submit the same key again
        else:
            resources = Resources.model_validate(job.resources)
            attempt = Attempt(
                job=job,
                number=(last.number + 1) if last else 1,
                backend=job.launcher,
                state="submitting",
                accelerators=resources.nodes * resources.gpus_per_node,
            )
            session.add(attempt)
        session.flush()
        folder = Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        kind.prepare(self.ctx, session, job, attempt.number).write(folder)
        spec = job_spec(str(job.id), job.kind, folder, job.resources, attempt.number, self.settings.python)
        attempt.log_path = str(spec.log_dir / f"attempt-{attempt.number}.log")
        return Prepared(job.id, attempt.number, job.launcher, KINDS[job.kind].queue, spec)

    def _submitted(self, prepared: Prepared, launcher: Launcher, backend_job_id: str | None, error: str | None) -> bool:
        """Record what the scheduler answered for one prepared attempt."""
        with self.db.transaction() as session:
            job = get_job(session, Job, prepared.job_id, "job", lock=True)
            attempt = next(a for a in job.attempts if a.number == prepared.attempt)
            if error is not None:
                close_attempt(attempt, reason=f"submission failed: {error}")
                if not Status(job.status).terminal:
                    advance(session, job, Status.FAILED, ACTOR, f"submission failed: {error}")
                return False
            attempt.backend_job_id, attempt.state = backend_job_id, "pending"
            record_event(session, job, "attempt", ACTOR, "submitted", number=prepared.attempt, job_id=backend_job_id)
            if Status(job.status) == Status.QUEUED:
                transition(session, job, Status.SUBMITTED, ACTOR, f"{prepared.launcher} job {backend_job_id}")
            elif Status(job.status).terminal:  # cancelled while we were submitting
                launcher.cancel(str(backend_job_id))
        return True

    # ------------------------------------------------------------------ following

    def _quiet(self, job: Tracked, polls: dict[str, JobStatus], now: datetime) -> bool:
        """Nothing can change for this job in this pass, judged from the pass's snapshot without a lock: a job
        its scheduler still queues, or a healthy running job whose files hold nothing new. Everything else
        takes the locking transaction, which decides again from the locked rows."""
        if job.attempt_state is None:
            return True  # nothing submitted yet (a queued job is launched, not followed)
        poll = polls.get(job.backend_job_id or "")
        if job.attempt_state == "pending":
            if poll is None:
                return False
            unchanged = poll.state == JobState.PENDING and poll.restarts <= job.restarts_seen
            return unchanged and job.status in (Status.SUBMITTED, Status.REQUEUED)
        if job.attempt_state != "running" or job.status != Status.RUNNING:
            return False
        if poll is None:
            return True  # the scheduler did not answer this pass: nothing to apply
        if poll.state != JobState.RUNNING or poll.restarts > job.restarts_seen or job.attempt_started_at is None:
            return False
        if job.attempt_host is None and poll.host is not None:
            return False
        signs = [t for t in (job.heartbeat_at, job.attempt_started_at, poll.started_at) if t is not None]
        if now - max(signs) > timedelta(seconds=self.settings.heartbeat_timeout_s):
            return False
        return not handler(job.kind).has_news(self.ctx, job.folder, job.launcher)

    def _follow_batch(self, batch: list[Tracked], polls: dict[str, JobStatus], stats: PassStats) -> None:
        """Apply the scheduler's word to a batch of jobs in one transaction: their rows locked together
        (PostgreSQL skips rows another transaction holds, e.g. a report being applied: they come back next
        pass; SQLite's writer lock covers the batch), one savepoint per job so one bad job fails alone."""
        relaunch = [
            job.job_id
            for job in batch
            if (job.attempt_state == "submitting" and not job.status.terminal)
            or (job.status == Status.REQUEUED and job.attempt_state == "ended")
        ]
        followed = {job.job_id: job for job in batch if job.job_id not in relaunch}
        requeued: list[uuid.UUID] = []
        if followed:
            with self.db.transaction() as session:
                for job in lock_jobs(session, list(followed)):
                    tracked = followed[job.id]
                    try:
                        with session.begin_nested():
                            stats.settled += self._follow(session, job, tracked, polls)
                    except JobFileError as exc:  # a malicious or corrupt file fails this job, and only this job
                        with session.begin_nested():
                            self._untrusted(session, job, polls.get(tracked.backend_job_id or ""), tracked, exc)
                        stats.settled += 1
                    except Exception as exc:  # one bad job must not stop the others
                        log.exception("%s job %s", tracked.kind, tracked.job_id)
                        stats.errors.append(f"{tracked.kind} {tracked.job_id}: {exc}")
                        continue
                    if Status(job.status) == Status.REQUEUED:
                        requeued.append(job.id)
        for job_id in [*relaunch, *requeued]:
            try:
                self._launch(job_id)
            except Exception as exc:
                log.exception("relaunch of job %s", job_id)
                stats.errors.append(f"relaunch of {job_id}: {exc}")

    def _follow(self, session: Session, job: Job, tracked: Tracked, polls: dict[str, JobStatus]) -> int:
        """One job of a batch, its row locked; 1 if its attempt was settled."""
        attempt = current_attempt(job)
        if attempt is None:
            return 0
        if attempt.state == "submitting":
            if Status(job.status).terminal:
                close_attempt(attempt, reason="cancelled before its submission completed")
            return 0  # otherwise launched again below the batch
        poll = polls.get(attempt.backend_job_id or "")
        if poll is None:
            return 0
        launcher = self.launchers.get(tracked.launcher, tracked.queue)
        return self._apply_poll(session, job, attempt, poll, tracked, launcher)

    def _apply_poll(
        self, session: Session, job: Job, attempt: Attempt, poll: JobStatus, tracked: Tracked, launcher: Launcher
    ) -> int:
        """What the scheduler's word means for the job (inside the job's locking transaction); 1 if settled."""
        if poll.restarts > tracked.restarts_seen and not Status(job.status).terminal:
            number = attempt.number + poll.restarts - tracked.restarts_seen
            attempt = scheduler_restart(session, job, number, ACTOR, poll.reason or "requeued by the scheduler")
            if self._over_budget(session, job, launcher, attempt):
                return 1
        status = Status(job.status)
        if status.terminal:  # cancelled (or settled) while the job still runs: stop it, then close the attempt
            if not poll.state.ended:
                launcher.cancel(str(attempt.backend_job_id))
                return 0
            close_attempt(attempt, poll)
            handler(job.kind).running(self.ctx, session, job, attempt.number)
            return 1
        if poll.state == JobState.PENDING:
            return 0
        if poll.state == JobState.RUNNING:
            attempt.state = "running"
            attempt.host = attempt.host or poll.host
            attempt.started_at = attempt.started_at or poll.started_at or utcnow()
            if status in (Status.SUBMITTED, Status.REQUEUED, Status.PREEMPTED):
                advance(session, job, Status.RUNNING, ACTOR, f"running on {poll.host or 'its node'}")
            self._check_heartbeat(session, job, attempt, poll, launcher)
            handler(job.kind).running(self.ctx, session, job, attempt.number)
            return 0
        self._settle(session, job, attempt, poll)  # the scheduler job ended: the result file decides
        return 1

    def _untrusted(
        self, session: Session, job: Job, poll: JobStatus | None, tracked: Tracked, exc: JobFileError
    ) -> None:
        """Fail a job whose files cannot be trusted; stop its scheduler job first if it still runs."""
        attempt = current_attempt(job)
        if attempt is not None and (poll is None or not poll.state.ended):
            self.launchers.get(tracked.launcher, tracked.queue).cancel(str(attempt.backend_job_id))
        elif attempt is not None:
            close_attempt(attempt, poll, reason=f"untrusted job file: {exc}")
        if not Status(job.status).terminal:
            advance(session, job, Status.FAILED, ACTOR, f"untrusted job file: {exc}")

    def _over_budget(self, session: Session, job: Job, launcher: Launcher, attempt: Attempt) -> bool:
        """Scheduler-side requeues count against the same budget as ours: past it, stop the job and fail."""
        if job.requeues <= self.settings.max_requeues:
            return False
        launcher.cancel(str(attempt.backend_job_id))
        close_attempt(attempt, reason="requeue budget exhausted")
        advance(
            session, job, Status.FAILED, ACTOR, f"requeued by the scheduler; gave up after {job.requeues - 1} requeues"
        )
        return True

    def _check_heartbeat(self, session: Session, job: Job, attempt: Attempt, poll: JobStatus, launcher: Any) -> None:
        """A job the scheduler calls running but that has said nothing for too long is hung: stop it (it is
        then settled like a lost job). Measured from its latest sign of life, a (re)start included."""
        timeout = timedelta(seconds=self.settings.heartbeat_timeout_s)
        signs = [t for t in (job.last_heartbeat_at, attempt.started_at, poll.started_at) if t is not None]
        last = max(signs) if signs else None
        if last is not None and utcnow() - last > timeout:
            record_event(session, job, "lost", ACTOR, f"no heartbeat for {timeout}; stopping the job to requeue it")
            attempt.exit_reason = f"{NO_HEARTBEAT} {timeout}"
            launcher.cancel(str(attempt.backend_job_id))

    def _settle(self, session: Session, job: Job, attempt: Attempt, poll: JobStatus) -> None:
        """Close the attempt and decide the job's next state from the scheduler's word and the result file."""
        folder = Path(job.folder)
        number = attempt.number
        while (folder / f"result-{number + 1}.json").exists():  # restarts of the same job left later results
            number += 1
        if number > attempt.number:
            attempt = scheduler_restart(session, job, number, ACTOR, "requeued by the scheduler")
        close_attempt(attempt, poll)
        kind = handler(job.kind)
        kind.running(self.ctx, session, job, attempt.number)
        result = read_result(folder, attempt.number)
        outcome = result.status if result else None
        reason = result.reason if result else None
        if outcome == "completed" and poll.state == JobState.COMPLETED:
            assert result is not None
            succeeded, why = kind.completed(self.ctx, session, job, attempt.number, result)
            advance(session, job, Status.SUCCEEDED if succeeded else Status.FAILED, ACTOR, why)
        elif outcome == "stopped" and poll.state == JobState.COMPLETED:
            advance(session, job, Status.STOPPED, ACTOR, reason or "stopped early")
        elif (
            outcome == "interrupted"
            or (poll.state in (JobState.PREEMPTED, JobState.LOST) and outcome != "failed")
            or (outcome is None and (attempt.exit_reason or "").startswith(NO_HEARTBEAT))
        ):
            why = attempt.exit_reason = reason or attempt.exit_reason or poll.reason or poll.state.value
            if job.requeues < self.settings.max_requeues:
                advance(session, job, Status.PREEMPTED, ACTOR, why)
                job.requeues += 1
                transition(session, job, Status.REQUEUED, ACTOR, f"requeue {job.requeues}/{self.settings.max_requeues}")
            else:
                advance(session, job, Status.FAILED, ACTOR, f"{why}; gave up after {job.requeues} requeues")
        elif poll.state == JobState.CANCELLED and result is None:
            advance(session, job, Status.CANCELLED, ACTOR, poll.reason or "cancelled by the scheduler")
        else:
            why = reason or poll.reason or f"job {poll.state.value}"
            if result is None and poll.state == JobState.COMPLETED:
                why = "job exited 0 without a result file"
            elif result is None:
                why += full_disk(folder)
            attempt.exit_reason = why
            retry = kind.retry_failure(job)
            if retry is not None:
                transition(session, job, Status.REQUEUED, ACTOR, f"attempt {attempt.number} failed ({why}); {retry}")
            else:
                advance(session, job, Status.FAILED, ACTOR, why)

    # ------------------------------------------------------------------ MLflow

    def _sync_mlflow(self, stats: PassStats) -> None:
        """MLflow follows SQL for every terminal state, whoever ended the job (user, scheduler, settle)."""
        if self.mlflow is None:
            return
        with self.db.sessions() as session:
            jobs = JOBS.c
            pending = session.execute(
                select(jobs.id, jobs.status, jobs.mlflow_run_id).where(
                    ~jobs.mlflow_synced,  # the predicate of the partial index ix_jobs_unsynced
                    jobs.status.in_([s.value for s in TERMINAL]),
                    jobs.mlflow_run_id.is_not(None),
                )
            ).all()
        for job_id, status, run_id in pending:
            try:
                self.mlflow.terminate(str(run_id), Status(status))
            except Exception as exc:  # MLflow is the view, SQL the truth: try again next pass
                stats.errors.append(f"MLflow status of {job_id} not updated: {exc}")
                continue
            with self.db.transaction() as session:
                job = session.get(Job, job_id)
                if job is not None:
                    job.mlflow_synced = True
