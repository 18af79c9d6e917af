"""Every branch of the reconciler, for every kind of job, in milliseconds: a scripted fake scheduler
(`FakeLauncher`) plays the jobs, the real reconciler, lifecycle and SQL (SQLite) do the rest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.db.models import Checkpoint, Evaluation, Event, Job, Run
from orchestrator.errors import ConflictError, InvalidInputError
from orchestrator.evaluations import request, retry_evaluation
from orchestrator.jobs.files import JobFile
from orchestrator.jobs.records import cancel, get_job
from orchestrator.launchers import Launchers
from orchestrator.launchers.base import JobSpec
from orchestrator.schemas import EvaluationCreate
from tests.harness import Harness
from tests.support import FASHION_MNIST


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, max_requeues=1, heartbeat_timeout_s=60.0)
    yield harness
    harness.db.dispose()


def test_a_run_goes_from_queued_to_succeeded_with_its_attempt_closed(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    job = h.job(run_id)
    assert job.status == "submitted" and [a.state for a in job.attempts] == ["pending"]
    written = JobFile.read(Path(job.folder))
    assert written.kind == "train" and written.report_path == f"/api/v1/runs/{run_id}/reports"
    assert written.payload["config"]["optim"]["epochs"] == 2 and written.mlflow_run_id == "mlflow-0"
    spec = h.fake.jobs[h.scheduler_id(run_id)].spec
    assert spec.argv[1:4] == ["-m", "orchestrator.jobs", job.folder]
    h.fake.start(h.scheduler_id(run_id), started_at=datetime.now(UTC) - timedelta(seconds=30))
    h.tick()
    assert h.job(run_id).status == "running" and h.job(run_id).attempts[0].host == "fake-node"
    h.fake.finish(h.scheduler_id(run_id), "completed", checkpoint=h.final_checkpoint(run_id), iteration=16)
    h.tick()
    job = h.job(run_id)
    assert (job.status, job.status_reason) == ("succeeded", "training completed")
    attempt = job.attempts[0]
    assert attempt.state == "ended" and attempt.exit_code == 0 and attempt.accelerators == 1
    assert attempt.accelerator_seconds is not None and attempt.accelerator_seconds >= 29
    assert h.statuses(run_id) == ["queued", "submitted", "running", "succeeded"]
    assert h.mlflow.runs == {"mlflow-0": "FINISHED"}


def test_completion_without_the_final_checkpoint_or_result_file_is_never_a_success(h: Harness) -> None:
    missing, silent = h.submit(), h.submit()
    h.tick()
    folder = Path(h.job(missing).folder)
    h.fake.finish(h.scheduler_id(missing), "completed", checkpoint=str(folder / "train" / "checkpoint0001.pth"))
    h.fake.finish(h.scheduler_id(silent), None)  # exit 0, no result file
    h.tick()
    assert h.job(missing).status == "failed" and "final checkpoint is missing" in (h.job(missing).status_reason or "")
    assert h.job(silent).status == "failed" and h.job(silent).status_reason == "job exited 0 without a result file"


def test_preempted_run_is_requeued_with_a_new_attempt_and_the_old_one_closed(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    first = h.scheduler_id(run_id)
    h.fake.start(first)
    h.tick()
    h.fake.finish(first, "interrupted", reason="SIGTERM: checkpoint written")
    h.tick()  # settles attempt 1, requeues and submits attempt 2 in the same pass
    job = h.job(run_id)
    assert job.status == "requeued" and job.requeues == 1
    assert [(a.number, a.state) for a in job.attempts] == [(1, "ended"), (2, "pending")]
    assert job.attempts[0].exit_code == 75 and job.attempts[0].exit_reason == "SIGTERM: checkpoint written"
    assert job.attempts[0].accelerator_seconds is not None
    second = h.scheduler_id(run_id)
    assert second != first and h.fake.jobs[second].spec.attempt == 2
    h.fake.start(second)
    h.fake.finish(second, "completed", checkpoint=h.final_checkpoint(run_id))
    h.tick()
    assert h.job(run_id).status == "succeeded"
    assert h.statuses(run_id) == ["queued", "submitted", "running", "preempted", "requeued", "running", "succeeded"]


def test_a_lost_job_is_requeued_until_the_budget_is_spent_then_failed(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    h.fake.start(h.scheduler_id(run_id))
    h.tick()
    h.fake.lose(h.scheduler_id(run_id))
    h.tick()
    assert h.job(run_id).status == "requeued"
    h.fake.start(h.scheduler_id(run_id))
    h.tick()
    h.fake.lose(h.scheduler_id(run_id))
    h.tick()
    job = h.job(run_id)
    assert job.status == "failed" and "gave up after 1 requeues" in (job.status_reason or "")
    assert [a.state for a in job.attempts] == ["ended", "ended"] and all(a.accelerator_seconds for a in job.attempts)


def test_a_silent_job_is_stopped_and_settled_as_lost(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    h.fake.start(h.scheduler_id(run_id), started_at=datetime.now(UTC) - timedelta(minutes=5))
    h.tick()  # running; its start is older than the 60 s heartbeat timeout and it never reported
    assert h.fake.cancelled == [h.scheduler_id(run_id)]
    h.tick()  # the scheduler reports it cancelled, without a result file: lost, not cancelled by a user
    job = h.job(run_id)
    assert job.status == "requeued" and job.attempts[0].exit_reason.startswith("lost: no heartbeat")


def test_heartbeats_keep_a_long_job_alive(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    h.fake.start(h.scheduler_id(run_id), started_at=datetime.now(UTC) - timedelta(minutes=5))
    h.report(run_id, kind="start", attempt=1, host="node-1", iteration=0, total_iterations=16)
    h.report(run_id, kind="heartbeat", attempt=1, iteration=4, metrics={"train/loss": 6.5})
    h.tick()
    assert h.fake.cancelled == [] and h.job(run_id).status == "running"
    run = h.job(run_id)
    assert isinstance(run, Run) and run.progress["iteration"] == 4 and run.progress["total_iterations"] == 16


def test_cancel_while_running_stops_the_job_and_closes_the_attempt(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    h.fake.start(h.scheduler_id(run_id))
    h.tick()
    h.fake.ignore_cancel = True  # a scheduler that takes its time: the reconciler asks again each pass
    with h.db.transaction() as session:
        cancel(session, get_job(session, Job, run_id, "run", lock=True), "api:alice")
    h.tick(2)
    assert h.fake.cancelled == [h.scheduler_id(run_id)] * 2 and h.job(run_id).attempts[0].state == "running"
    h.fake.ignore_cancel = False
    h.tick()  # asked once more, the scheduler stops the job ...
    assert h.job(run_id).attempts[0].state == "running"
    h.tick()  # ... and the next pass sees it ended and closes the attempt
    job = h.job(run_id)
    assert job.status == "cancelled" and job.attempts[0].state == "ended"
    assert job.attempts[0].accelerator_seconds is not None
    assert h.mlflow.runs == {"mlflow-0": "KILLED"}  # MLflow follows SQL for a user's cancel too
    with h.db.transaction() as session, pytest.raises(ConflictError):
        cancel(session, get_job(session, Job, run_id, "run", lock=True), "api:alice")


def test_a_run_cancelled_while_its_submission_is_in_flight_has_its_job_stopped(h: Harness) -> None:
    run_id = h.submit()

    def cancel_now(spec: JobSpec) -> None:
        with h.db.transaction() as session:
            cancel(session, get_job(session, Job, spec.job_id, "run", lock=True), "api:alice")

    h.fake.before_submit = cancel_now
    h.tick()
    assert h.job(run_id).status == "cancelled" and h.fake.cancelled == [h.scheduler_id(run_id)]
    h.fake.before_submit = None
    h.tick()
    assert h.job(run_id).attempts[0].state == "ended"


def test_a_crash_between_commit_and_submit_resubmits_the_same_attempt_once(h: Harness) -> None:
    run_id = h.submit()

    def crash(spec: JobSpec) -> None:
        raise RuntimeError("service killed mid-submission")

    h.fake.before_submit = crash
    stats = h.reconciler.reconcile_once()
    assert stats.errors and h.job(run_id).attempts[0].state == "submitting"
    h.fake.before_submit = None
    h.tick()
    job = h.job(run_id)
    assert job.status == "submitted" and [(a.number, a.state) for a in job.attempts] == [(1, "pending")]
    assert len(h.fake.jobs) == 1


def test_a_refused_submission_fails_the_run_with_the_schedulers_reason(h: Harness) -> None:
    run_id = h.submit()
    h.fake.refuse_next = "sbatch: error: invalid partition"
    h.tick()
    job = h.job(run_id)
    assert job.status == "failed" and "invalid partition" in (job.status_reason or "")
    assert job.attempts[0].state == "ended"


def test_capacity_limits_how_many_jobs_launch(h: Harness) -> None:
    h.fake.free = 1
    first, second = h.submit(), h.submit()
    h.tick()
    assert (h.job(first).status, h.job(second).status) == ("submitted", "queued")
    h.fake.finish(h.scheduler_id(first), "completed", checkpoint=h.final_checkpoint(first))
    h.tick(2)
    assert h.job(second).status == "submitted"


def test_a_scheduler_requeue_closes_the_attempt_and_counts_as_a_requeue(h: Harness) -> None:
    """`scontrol requeue`: the same scheduler job id runs again as attempt 2."""
    run_id = h.submit(launcher="slurm")
    h.tick()
    job_id = h.scheduler_id(run_id)
    h.fake.start(job_id)
    h.tick()
    h.fake.finish(job_id, "interrupted", reason="SIGTERM")  # the job checkpoints ...
    h.fake.restart(job_id)  # ... and the scheduler puts it back in its queue under the same id
    h.tick()
    job = h.job(run_id)
    assert job.status == "requeued" and job.requeues == 1
    assert [(a.number, a.state, a.backend_job_id) for a in job.attempts] == [
        (1, "ended", job_id),
        (2, "pending", job_id),
    ]
    assert job.attempts[0].ended_at is not None and job.attempts[0].accelerator_seconds is not None
    h.fake.start(job_id)
    h.report(run_id, kind="start", attempt=2, host="node-2")
    h.tick()
    h.fake.finish(job_id, "completed", checkpoint=h.final_checkpoint(run_id))
    h.tick()
    job = h.job(run_id)
    assert job.status == "succeeded" and [a.state for a in job.attempts] == ["ended", "ended"]
    assert h.statuses(run_id) == ["queued", "submitted", "running", "preempted", "requeued", "running", "succeeded"]


def test_a_start_report_of_the_next_attempt_closes_the_previous_one(h: Harness) -> None:
    run_id = h.submit(launcher="slurm")
    h.tick()
    h.fake.start(h.scheduler_id(run_id))
    h.report(run_id, kind="start", attempt=1, host="node-1")
    h.report(run_id, kind="start", attempt=2, host="node-1")  # SLURM restarted it before we polled
    job = h.job(run_id)
    assert [(a.number, a.state) for a in job.attempts] == [(1, "ended"), (2, "running")] and job.requeues == 1
    for bad in (3, 99):
        with pytest.raises(InvalidInputError, match="not the job's current attempt"):
            h.report(run_id, kind="heartbeat", attempt=bad)


def test_scheduler_requeues_past_the_budget_stop_the_job(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_requeues=0)
    run_id = h.submit(launcher="slurm")
    h.tick()
    h.fake.start(h.scheduler_id(run_id))
    h.tick()
    h.fake.restart(h.scheduler_id(run_id))
    h.tick()
    job = h.job(run_id)
    assert job.status == "failed" and "gave up after 0 requeues" in (job.status_reason or "")
    assert h.fake.cancelled == [h.scheduler_id(run_id)]


def test_dry_run_launcher_jobs_end_cancelled_with_their_mlflow_run(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.reconciler.launchers = Launchers(h.settings)  # the real dry-run launcher
    run_id = h.submit(launcher="dryrun")
    h.tick(2)
    job = h.job(run_id)
    assert (job.status, job.status_reason) == ("cancelled", "dry-run launcher: nothing was started")
    assert h.mlflow.runs == {"mlflow-0": "KILLED"}


def test_mlflow_status_is_retried_until_mlflow_answers(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    h.mlflow.fail = True
    with h.db.transaction() as session:
        cancel(session, get_job(session, Job, run_id, "run", lock=True), "api:alice")
    stats = h.reconciler.reconcile_once()
    assert any("MLflow" in e for e in stats.errors) and h.mlflow.runs["mlflow-0"] == "RUNNING"
    h.mlflow.fail = False
    h.tick()
    assert h.mlflow.runs["mlflow-0"] == "KILLED" and h.job(run_id).mlflow_synced


# ---------------------------------------------------------------------------------------------- evaluations


def _checkpointed_run(h: Harness) -> tuple[Any, Any]:
    run_id = h.submit()
    with h.db.transaction() as session:
        run = get_job(session, Run, run_id, "run")
        checkpoint = Checkpoint(
            run_id=run.id, attempt=1, path=h.final_checkpoint(run_id), epoch=2, step=16, sha256="b" * 64, kind="epoch"
        )
        session.add(checkpoint)
        session.flush()
        return run.id, checkpoint.id


def _evaluate(h: Harness, run_id: Any, checkpoint_id: Any, **spec: Any) -> tuple[Any, bool]:
    body = EvaluationCreate.model_validate({"benchmark": "knn", "data": str(FASHION_MNIST), **spec})
    with h.db.transaction() as session:
        run = get_job(session, Run, run_id, "run")
        checkpoint = session.get(Checkpoint, checkpoint_id)
        assert checkpoint is not None
        evaluation, created = request(session, h.settings, run, checkpoint, body, "manual", "api:alice")
        return evaluation.id, created


def test_an_evaluation_is_a_job_with_attempts_retries_and_a_final_failure(h: Harness) -> None:
    run_id, checkpoint_id = _checkpointed_run(h)
    with h.db.transaction() as session:  # the pretraining run is done: only the evaluation is followed
        cancel(session, get_job(session, Job, run_id, "run", lock=True), "test")
    evaluation_id, created = _evaluate(h, run_id, checkpoint_id, max_attempts=2)
    assert created
    h.tick()
    job = h.job(evaluation_id)
    assert job.status == "submitted" and h.fake.jobs[h.scheduler_id(evaluation_id)].spec.argv[2] == "orchestrator.jobs"
    written = JobFile.read(Path(job.folder))
    assert written.kind == "evaluate" and written.payload["checkpoint_sha256"] == "b" * 64
    assert written.report_path == f"/api/v1/evaluations/{evaluation_id}/reports"
    h.fake.finish(h.scheduler_id(evaluation_id), "failed", reason="CheckpointError: corrupt")
    h.tick()  # a failed attempt with attempts left is retried at once
    job = h.job(evaluation_id)
    assert job.status == "requeued" and [a.number for a in job.attempts] == [1, 2]
    assert "attempt 1 failed (CheckpointError: corrupt); retrying as attempt 2 of 2" in (job.status_reason or "")
    h.fake.finish(h.scheduler_id(evaluation_id), "failed", reason="CheckpointError: corrupt")
    h.tick()
    job = h.job(evaluation_id)
    assert isinstance(job, Evaluation) and job.status == "failed" and not job.live
    assert job.status_reason == "CheckpointError: corrupt" and all(a.state == "ended" for a in job.attempts)
    assert h.statuses(evaluation_id) == ["queued", "submitted", "requeued", "failed"]
    # a failed evaluation can be asked for again and retried: a new record, linked to the failed one
    with h.db.transaction() as session:
        failed = get_job(session, Evaluation, evaluation_id, "evaluation")
        again = retry_evaluation(session, h.settings, failed, "api:alice")
        assert again.retry_of_id == failed.id and again.status == "queued" and again.trigger == "retry"
        again_id = again.id
    same, created = _evaluate(h, run_id, checkpoint_id, max_attempts=2)
    assert (same, created) == (again_id, False)  # the live retry holds the key now
    with h.db.transaction() as session, pytest.raises(ConflictError, match="only failed or cancelled"):
        retry_evaluation(session, h.settings, get_job(session, Evaluation, again_id, "evaluation"), "api:alice")


def test_a_succeeded_evaluation_records_its_metrics_and_is_never_computed_twice(h: Harness) -> None:
    run_id, checkpoint_id = _checkpointed_run(h)
    evaluation_id, _ = _evaluate(h, run_id, checkpoint_id)
    h.tick()
    job_id = h.scheduler_id(evaluation_id)
    h.fake.start(job_id)
    h.tick()
    assert h.job(evaluation_id).status == "running"
    h.fake.finish(job_id, "completed", metrics={"knn/top1_k20": 71.25}, seconds=3.5, mlflow_run_id="child-1")
    h.tick()
    job = h.job(evaluation_id)
    assert isinstance(job, Evaluation) and job.status == "succeeded" and job.metrics == {"knn/top1_k20": 71.25}
    assert job.seconds == 3.5 and job.mlflow_run_id == "child-1" and job.live
    assert _evaluate(h, run_id, checkpoint_id) == (evaluation_id, False)
    with h.db.sessions() as session:
        run_events = session.scalars(select(Event).where(Event.job_id == run_id, Event.kind == "evaluation")).all()
        assert [e.reason for e in run_events][-1] == "knn succeeded"


def test_an_evaluation_is_preempted_and_requeued_like_a_run(h: Harness) -> None:
    run_id, checkpoint_id = _checkpointed_run(h)
    evaluation_id, _ = _evaluate(h, run_id, checkpoint_id, max_attempts=1)
    h.tick()
    h.fake.start(h.scheduler_id(evaluation_id))
    h.tick()
    h.fake.finish(h.scheduler_id(evaluation_id), "interrupted", reason="interrupted by SIGTERM")
    h.tick()
    job = h.job(evaluation_id)
    assert job.status == "requeued" and job.requeues == 1 and len(job.attempts) == 2


def test_a_missing_dataset_is_refused_when_the_evaluation_is_asked_for(h: Harness, tmp_path: Path) -> None:
    run_id, checkpoint_id = _checkpointed_run(h)
    with pytest.raises(InvalidInputError) as refused:
        _evaluate(h, run_id, checkpoint_id, data=str(tmp_path / "no-such-dataset"))
    assert refused.value.field == "data"
    with h.db.sessions() as session:
        assert session.scalars(select(Evaluation)).all() == []


def test_job_files_hold_no_secret_readable_by_others(h: Harness) -> None:
    run_id = h.submit()
    h.tick()
    path = Path(h.job(run_id).folder) / "job.json"
    assert path.stat().st_mode & 0o077 == 0 and json.loads(path.read_text())["token"]


def test_files_a_job_leaves_cannot_point_outside_its_folder_or_break_the_pass(h: Harness, tmp_path: Path) -> None:
    """A result or log naming files elsewhere, or a result file that is not one, fails that job alone."""
    outside, corrupt, log_escape, healthy = h.submit(), h.submit(), h.submit(), h.submit()
    h.tick()
    h.fake.finish(h.scheduler_id(outside), "completed", checkpoint="/etc/passwd")
    h.fake.start(h.scheduler_id(corrupt))
    h.fake.start(h.scheduler_id(log_escape))
    h.fake.start(h.scheduler_id(healthy))
    h.tick()
    h.fake.finish(h.scheduler_id(corrupt), None)  # exits 0 and leaves a result file that is not one:
    folder = Path(h.job(corrupt).folder)
    (folder / "result-1.json").write_text('{"status": "completed", "metrics": {"x": "NaN"}, "iteration": -1}')
    secret = tmp_path / "elsewhere.pth"
    secret.write_bytes(b"not yours")
    link = Path(h.job(log_escape).folder) / "train" / "checkpoint0000.pth"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)  # inside the folder by name, outside once resolved
    entry = {"event": "checkpoint", "path": str(link), "epoch": 1, "iteration": 8, "sha256": "d" * 64}
    (link.parent / "log.jsonl").write_text(json.dumps(entry) + "\n")
    stats = h.reconciler.reconcile_once()
    assert not stats.errors, stats.errors  # no job's file breaks the pass
    for job_id, why in (
        (outside, "'/etc/passwd' is outside the job's folder"),
        (corrupt, "result-1.json is not a valid result file"),
        (log_escape, "is outside the job's folder"),
    ):
        job = h.job(job_id)
        assert job.status == "failed" and why in (job.status_reason or ""), (job.status, job.status_reason)
    assert h.fake.cancelled == [h.scheduler_id(log_escape)]  # a job still running is stopped first
    assert h.job(healthy).status == "running"
    with h.db.sessions() as session:
        assert session.scalars(select(Checkpoint)).all() == []


def test_evaluations_that_name_no_launcher_go_to_the_eval_launcher(tmp_path: Path) -> None:
    h = Harness(tmp_path, eval_launcher="slurm")  # runs stay on the default launcher (local)
    try:
        run_id, checkpoint_id = _checkpointed_run(h)
        implicit, _ = _evaluate(h, run_id, checkpoint_id)
        explicit, _ = _evaluate(h, run_id, checkpoint_id, launcher="local", config="full")
        launchers = [h.job(job_id).launcher for job_id in (run_id, implicit, explicit)]
        assert launchers == ["local", "slurm", "local"]
    finally:
        h.db.dispose()
