"""The SLURM launcher against the real single-node cluster (`scripts/services.sh start`), accounting included."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.launchers import slurm as slurm_module
from orchestrator.launchers.base import JobSpec, JobState, JobStatus, LauncherError, Resources
from orchestrator.launchers.slurm import SlurmLauncher, status_from_sacct
from orchestrator.settings import Settings
from tests.launcher_support import (
    ITERS_PER_EPOCH,
    SMALL,
    ended,
    job_spec,
    make_run_dir,
    py,
    read_result,
    report_sink,
    trained_steps,
)
from tests.support import REPO, wait_for


def _slurm_answers() -> str | None:
    """None when sinfo and sacct work, else why not."""
    for command in (["sinfo", "-h", "-o", "%T"], ["sacct", "-n", "-X", "-S", "now"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{command[0]}: {exc}"
        if out.returncode != 0:
            return f"{command[0]}: {out.stderr.strip()[:300]}"
    return None


pytestmark = pytest.mark.services  # a real cluster


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    """The tests need the cluster: start it if it is down, and fail (never skip) if it cannot be reached."""
    problem = _slurm_answers()
    if problem is not None:
        env = {**os.environ, "WITH_BROWSER": "0"}
        subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "start"], env=env, check=False, timeout=600)
        problem = _slurm_answers()
    if problem is not None:
        pytest.fail(f"SLURM cannot be reached after `scripts/services.sh start` ({problem})", pytrace=False)


@pytest.fixture
def launcher(tmp_path: Path) -> SlurmLauncher:
    return SlurmLauncher(tmp_path / "state")


def _requeued(launcher: SlurmLauncher, job_id: str) -> JobStatus | None:
    status = launcher.poll(job_id)
    return status if status.restarts >= 1 else None


def _squeue_names(key: str) -> str:
    return subprocess.run(["squeue", "-h", "-n", key, "-o", "%i"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- no jobs


def test_render_is_submitits_script_with_the_options_and_no_side_effect(tmp_path: Path) -> None:
    launcher = SlurmLauncher(tmp_path / "state", default_partition="debug")
    resources = Resources(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        mem_gb=64,
        time_min=120,
        partition="gpu",
        account="lab",
        qos="high",
        extra={"constraint": "a100", "exclusive": "true", "nice": "10", "signal": "USR2@120"},
    )
    spec = JobSpec("r1", 3, "n", ["/venv/bin/python", "-m", "orchestrator.jobs", "/runs/r1", "--attempt", "3"],
                   tmp_path / "run", resources)  # fmt: skip
    script = launcher.render(spec)
    for line in (
        f"#SBATCH --job-name={spec.key}",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU
        "#SBATCH --gres=gpu:4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=120",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclusive",
        "#SBATCH --nice=10",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        f"#SBATCH --chdir={tmp_path / 'run'}",
        "export SUBMITIT_PREEMPT_SIGNAL=USR2",
    ):
        assert line in script.splitlines(), line
    assert "-m submitit.core._submit" in script and "--cpus-per-task=8" in script.split("srun", 1)[1]
    assert "orchestrator.jobs /runs/r1 --attempt 3" in script
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists()
    assert _squeue_names(spec.key) == ""
    # the default partition applies when the run names none
    plain = JobSpec("r2", 1, "n", ["python"], tmp_path / "run2", Resources())
    assert "#SBATCH --partition=debug" in launcher.render(plain).splitlines()
    assert "#SBATCH --gres" not in launcher.render(plain)


def test_sbatch_options_outside_the_whitelist_are_refused(tmp_path: Path, launcher: SlurmLauncher) -> None:
    with pytest.raises(ValidationError, match="not allowed: wrap"):
        Resources(extra={"wrap": "rm -rf /"})
    with pytest.raises(ValidationError, match="should match pattern"):
        Resources(extra={"comment": "x; scancel -u root"})
    # a Resources built without validation still cannot smuggle options through the launcher
    sneaky = Resources.model_construct(**{**SMALL.model_dump(), "extra": {"export": "LD_PRELOAD=/tmp/x.so"}})
    with pytest.raises(LauncherError, match="not allowed"):
        launcher.render(job_spec(tmp_path, ["true"], sneaky))
    with pytest.raises(ValidationError, match=r"extra\.signal"):
        Resources(extra={"signal": "B:TERM@60"})
    unchecked = Resources.model_construct(**{**SMALL.model_dump(), "extra": {"signal": "B:TERM@60"}})
    with pytest.raises(LauncherError, match=r"extra\.signal"):
        launcher.render(job_spec(tmp_path, ["true"], unchecked))
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("records", "state", "exit_code", "reason", "restarts"),
    [
        ([("PENDING", "0:0")], JobState.PENDING, None, None, 0),
        ([("CONFIGURING", "0:0")], JobState.PENDING, None, None, 0),
        ([("REQUEUED", "0:0"), ("PENDING", "0:0")], JobState.PENDING, None, "requeued", 1),
        ([("RUNNING", "0:0")], JobState.RUNNING, None, None, 0),
        ([("COMPLETING", "0:0")], JobState.RUNNING, None, "completing", 0),
        ([("COMPLETED", "0:0")], JobState.COMPLETED, 0, None, 0),
        ([("CANCELLED by 0", "0:15")], JobState.CANCELLED, -15, "CANCELLED by 0", 0),
        ([("CANCELLED by 0", "75:0")], JobState.CANCELLED, 75, "CANCELLED by 0", 0),
        ([("PREEMPTED", "0:15")], JobState.PREEMPTED, -15, "PREEMPTED", 0),
        ([("FAILED", "75:0")], JobState.PREEMPTED, 75, "FAILED: interrupted (exit 75), resume", 0),
        ([("FAILED", "1:0")], JobState.FAILED, 1, "FAILED", 0),
        ([("TIMEOUT", "0:15")], JobState.FAILED, -15, "TIMEOUT", 0),
        ([("NODE_FAIL", "0:0")], JobState.FAILED, 0, "NODE_FAIL", 0),
        ([("OUT_OF_MEMORY", "0:125")], JobState.FAILED, -125, "OUT_OF_MEMORY", 0),
        ([("BOOT_FAIL", "0:0")], JobState.FAILED, 0, "BOOT_FAIL", 0),
        ([("DEADLINE", "0:0")], JobState.FAILED, 0, "DEADLINE", 0),
        ([("REQUEUED", "0:0"), ("REQUEUED", "0:0"), ("COMPLETED", "0:0")], JobState.COMPLETED, 0, None, 2),
    ],
)
def test_sacct_states_map_to_job_states(
    records: list[tuple[str, str]], state: JobState, exit_code: int | None, reason: str | None, restarts: int
) -> None:
    rows = [
        {"State": s, "ExitCode": e, "Start": "Unknown", "End": "Unknown", "NodeList": "localhost"} for s, e in records
    ]
    status = status_from_sacct(rows)
    assert (status.state, status.exit_code, status.reason, status.restarts) == (state, exit_code, reason, restarts)


# ---------------------------------------------------------------------------------------------- jobs


def test_exit_codes_map_to_states_with_one_sacct_call(
    tmp_path: Path, launcher: SlurmLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = {code: job_spec(tmp_path, py(f"print('exit {code}'); raise SystemExit({code})")) for code in (0, 75, 1)}
    ids = {code: launcher.submit(spec) for code, spec in specs.items()}
    wait_for(
        lambda: all(s.state.ended for s in launcher.poll_many(list(ids.values())).values()),
        180,
        "the three jobs to end",
    )

    calls: list[list[str]] = []
    real_run = slurm_module._run

    def counting_run(command: list[str], timeout: float = 60.0) -> Any:
        calls.append(command)
        return real_run(command, timeout)

    monkeypatch.setattr(slurm_module, "_run", counting_run)
    statuses = launcher.poll_many(list(ids.values()))
    assert [c[0] for c in calls] == ["sacct"]  # one query for all jobs
    calls.clear()
    statuses.update(launcher.poll_many(["99999999"]))
    assert [c[0] for c in calls] == ["sacct", "squeue"]  # not in accounting: maybe just submitted, ask squeue
    assert statuses[ids[0]].state == JobState.COMPLETED and statuses[ids[0]].exit_code == 0
    assert statuses[ids[75]].state == JobState.PREEMPTED and statuses[ids[75]].exit_code == 75
    assert statuses[ids[1]].state == JobState.FAILED and statuses[ids[1]].exit_code == 1
    assert statuses["99999999"].state == JobState.LOST
    for job_id in ids.values():
        status = statuses[job_id]
        assert status.host == "localhost" and status.restarts == 0
        assert status.started_at is not None and status.ended_at is not None and status.ended_at >= status.started_at
    assert "exit 75" in launcher.logs(ids[75])
    assert Path(specs[75].log_dir / "attempt-1.log").read_text() == launcher.logs(ids[75])


def test_submit_is_idempotent_on_the_key(tmp_path: Path, launcher: SlurmLauncher) -> None:
    spec = job_spec(tmp_path, py("import time; time.sleep(2)"))
    job_id = launcher.submit(spec)
    assert launcher.submit(spec) == job_id
    # a service that lost its state folder (or crashed between sbatch and writing it) finds the job by name
    assert SlurmLauncher(tmp_path / "other-state").submit(spec) == job_id
    assert _squeue_names(spec.key) in ("", job_id)
    wait_for(lambda: ended(launcher, job_id), 120, "the job to end")
    assert SlurmLauncher(tmp_path / "third-state").submit(spec) == job_id  # found in accounting once it ended
    other = job_spec(tmp_path, py("pass"), attempt=2)
    assert launcher.submit(other) != job_id


def test_cancel_ends_cancelled_within_30_s(tmp_path: Path, launcher: SlurmLauncher) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"  # like the trainer: checkpoint, exit 75
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    spec = job_spec(tmp_path, py(code))
    job_id = launcher.submit(spec)
    wait_for(lambda: launcher.poll(job_id).state == JobState.RUNNING, 120, "the job to run")
    wait_for(lambda: "started" in launcher.logs(job_id), 60, "the job's first output")
    launcher.cancel(job_id)
    status = wait_for(lambda: ended(launcher, job_id), 30, "CANCELLED")
    assert status.state == JobState.CANCELLED, status
    launcher.cancel(job_id)  # cancelling an ended job is harmless


def test_an_array_runs_each_spec_as_its_own_task_within_its_parallelism(
    tmp_path: Path, launcher: SlurmLauncher
) -> None:
    """A sweep's trials on SLURM: one `sbatch --array=0-2%2`, each task its own job id, exit status and log;
    submitting again (or from a service that lost its state) finds the same tasks; one task cancels alone."""
    code = "import sys, time; print('task', sys.argv[1], flush=True); time.sleep(float(sys.argv[2]))"
    code += "; sys.exit(int(sys.argv[3]))"
    specs = [
        job_spec(tmp_path / str(i), [*py(code), str(i), seconds, exit_code])
        for i, (seconds, exit_code) in enumerate((("2", "0"), ("2", "1"), ("600", "0")))
    ]
    ids = launcher.submit_array(specs, parallelism=2)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1", f"{array}_2"]
    assert launcher.submit_array(specs, parallelism=2) == ids
    assert SlurmLauncher(tmp_path / "other-state").submit_array(specs, parallelism=2) == ids  # found by name
    throttle = subprocess.run(["scontrol", "show", "job", array], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=2" in throttle
    wait_for(lambda: "task 2" in launcher.logs(ids[2]), 120, "the third task to run")
    statuses = wait_for(
        lambda: (s := launcher.poll_many(ids[:2])) and all(v.state.ended for v in s.values()) and s, 120, "two tasks"
    )
    assert statuses[ids[0]].state == JobState.COMPLETED and statuses[ids[0]].exit_code == 0
    assert statuses[ids[1]].state == JobState.FAILED and statuses[ids[1]].exit_code == 1
    launcher.cancel(ids[2])
    assert wait_for(lambda: ended(launcher, ids[2]), 30, "CANCELLED").state == JobState.CANCELLED
    for i, (spec, job_id) in enumerate(zip(specs, ids, strict=True)):
        assert f"task {i}" in launcher.logs(job_id)
        assert (spec.log_dir / "attempt-1.log").read_text() == launcher.logs(job_id)


def test_a_pending_array_task_is_pending_not_lost(tmp_path: Path, launcher: SlurmLauncher) -> None:
    """Accounting holds the tasks an array has not started as one `A_[1-2%1]` record; squeue answers."""
    specs = [job_spec(tmp_path / str(i), py("import time; time.sleep(5)")) for i in range(3)]
    ids = launcher.submit_array(specs, parallelism=1)
    statuses = launcher.poll_many(ids)
    assert statuses[ids[2]].state == JobState.PENDING, statuses
    for job_id in ids:
        launcher.cancel(job_id)


def _real_worker_spec(tmp_path: Path, api_url: str, epochs: int) -> JobSpec:
    run_dir = make_run_dir(tmp_path / f"run-{uuid.uuid4().hex[:8]}", api_url, "slurm", epochs)
    argv = [sys.executable, "-m", "orchestrator.jobs", str(run_dir), "--attempt", "1"]
    resources = Resources(cpus_per_task=1, mem_gb=3, time_min=30)
    return JobSpec(job_id=run_dir.name, attempt=1, name="micro", argv=argv, workdir=run_dir, resources=resources)


def _check_resumed(spec: JobSpec, launcher: SlurmLauncher, job_id: str, total: int) -> None:
    first, second = read_result(spec.workdir, 1), read_result(spec.workdir, 2)
    assert first is not None and first.status == "interrupted", first
    assert 0 < first.iteration < total
    assert second is not None and second.status == "completed", second
    assert second.iteration == total
    final = launcher.poll(job_id)
    assert final.state == JobState.COMPLETED and final.exit_code == 0 and final.restarts == 1, final
    log = launcher.logs(job_id, tail=2000)
    assert f"resumed from {spec.workdir / 'train' / 'checkpoint.pth'} at iteration {first.iteration}" in log
    steps = [int(s) for s in _logged_steps(spec)]
    assert steps == sorted(set(steps)), "attempt 2 repeated steps: it did not resume"


def _logged_steps(spec: JobSpec) -> list[str]:
    import json

    lines = (spec.workdir / "train" / "log.jsonl").read_text().splitlines()
    return [str(json.loads(x)["iteration"]) for x in lines if '"event": "step"' in x]


def test_submitit_signal_checkpoints_requeues_and_attempt_2_resumes(tmp_path: Path, launcher: SlurmLauncher) -> None:
    """USR2 (what SLURM sends before the time limit, `--signal=USR2@90`): submitit calls checkpoint(), which
    stops the worker at a checkpoint, then requeues the job; the same job id comes back as attempt 2."""
    epochs = 2
    with report_sink() as sink:
        spec = _real_worker_spec(tmp_path, sink.url, epochs)
        job_id = launcher.submit(spec)
        wait_for(lambda: trained_steps(spec.workdir) >= 2, 300, "the first training steps")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        requeued = wait_for(lambda: _requeued(launcher, job_id), 120, "the requeue")
        assert requeued.state in (JobState.PENDING, JobState.RUNNING)
        wait_for(lambda: ended(launcher, job_id), 600, "attempt 2 to finish")
        _check_resumed(spec, launcher, job_id, epochs * ITERS_PER_EPOCH)
        log = launcher.logs(job_id, tail=2000)
        assert "Calling checkpoint method" in log and f"Requeued job {job_id}" in log
        assert {"start", "end"} <= set(sink.kinds())


def test_scontrol_requeue_resumes_from_the_checkpoint(tmp_path: Path, launcher: SlurmLauncher) -> None:
    """`scontrol requeue` (as SLURM preemption with PreemptMode=REQUEUE): SIGTERM to every process, the
    worker checkpoints and exits 75, SLURM restarts the same job with SLURM_RESTART_COUNT=1."""
    epochs = 2
    with report_sink() as sink:
        spec = _real_worker_spec(tmp_path, sink.url, epochs)
        job_id = launcher.submit(spec)
        wait_for(lambda: trained_steps(spec.workdir) >= 2, 300, "the first training steps")
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        requeued = wait_for(lambda: _requeued(launcher, job_id), 120, "the requeue")
        assert requeued.state in (JobState.PENDING, JobState.RUNNING)
        wait_for(lambda: ended(launcher, job_id), 600, "attempt 2 to finish")
        _check_resumed(spec, launcher, job_id, epochs * ITERS_PER_EPOCH)


def test_a_timeout_past_submitits_budget_ends_preempted_not_failed(tmp_path: Path) -> None:
    """submitit refuses to requeue after max_num_timeout timeouts (here 0; with time_min <= 50 every signal
    counts as a timeout): the worker has already checkpointed and exited 75, so the job says PREEMPTED and
    the reconciler's own requeue budget decides."""
    launcher = SlurmLauncher(tmp_path / "state", max_num_timeout=0)
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('checkpointed', flush=True), sys.exit(75)))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    job_id = launcher.submit(job_spec(tmp_path, py(code)))
    wait_for(lambda: "started" in launcher.logs(job_id), 120, "the job's first output")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    status = wait_for(lambda: ended(launcher, job_id), 120, "the job to end")
    assert status.state == JobState.PREEMPTED and status.exit_code == 75 and status.restarts == 0, status
    log = launcher.logs(job_id)
    assert "checkpointed" in log and "timed-out too many times" in log


def test_jobs_inherit_what_they_need_and_never_the_services_secrets(
    tmp_path: Path, launcher: SlurmLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_SECRET_KEY", "canary-secret")  # what the service's own environment holds
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql://orch:canary@db/orch")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("TZ", "UTC")
    wider = SlurmLauncher(tmp_path / "wider", export_env=("NCCL_SOCKET_IFNAME",))
    code = "import os; print(sorted(k for k in os.environ if k.startswith(('ORCH_', 'NCCL_', 'TZ'))))"
    specs = [job_spec(tmp_path / name, py(code)) for name in ("plain", "wider")]
    ids = [launcher.submit(specs[0]), wider.submit(specs[1])]
    for job_id in ids:
        wait_for(lambda job_id=job_id: ended(launcher, job_id), 120, "the job to end")
    # ORCH_RUN_ID is the job's own (the worker sets it), not inherited
    assert "['ORCH_RUN_ID', 'TZ']" in launcher.logs(ids[0]) and "canary" not in launcher.logs(ids[0])
    assert "['NCCL_SOCKET_IFNAME', 'ORCH_RUN_ID', 'TZ']" in wider.logs(ids[1])
    with pytest.raises(ValidationError, match="not passed to jobs"):
        Settings(slurm_export_env="PATH,ORCH_SECRET_KEY")
