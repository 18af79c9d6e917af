"""The Ray launcher against a real local Ray cluster, started by the launcher itself and stopped at the end."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.launchers.base import JobSpec, JobState, LauncherError, Resources
from orchestrator.launchers.ray import CLUSTER_FILE, RayLauncher, _alive, _free_ports, _session_members
from tests.launcher_support import (
    ITERS_PER_EPOCH,
    SMALL,
    ended,
    job_spec,
    make_run_dir,
    py,
    read_result,
    report_sink,
)
from tests.support import wait_for

pytestmark = pytest.mark.services  # a real cluster


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayLauncher]:
    """One private cluster for the module; the tests fail (never skip) if it cannot start or answer."""
    state_dir = tmp_path_factory.mktemp("ray-state")
    ray = RayLauncher(None, state_dir, num_cpus=2)
    try:
        ray.ensure_cluster()
        ray.poll_many(["probe-a", "probe-b"])  # the job API answers
    except LauncherError as exc:
        ray.close()
        pytest.fail(f"the local Ray cluster cannot be started or reached: {exc}", pytrace=False)
    record = json.loads((state_dir / CLUSTER_FILE).read_text())
    yield ray
    ray.close()
    # everything it started is gone: the blocking `ray start`, its session, its temp dir and address file
    assert not _alive(record["pid"], record["ticks"])
    assert _session_members(record["pid"]) == []
    assert not Path(record["temp_dir"]).exists() and not (state_dir / CLUSTER_FILE).exists()


def test_render_is_the_job_spec_without_side_effects(tmp_path: Path) -> None:
    fresh = RayLauncher(None, tmp_path / "state")
    spec = JobSpec("r1", 2, "n", ["/venv/bin/python", "-m", "orchestrator.jobs", "/runs/r1", "--attempt", "2"],
                   tmp_path / "run", Resources(gpus_per_node=4, cpus_per_task=3, mem_gb=1.5))  # fmt: skip
    rendered = json.loads(fresh.render(spec))
    assert rendered["submission_id"] == spec.key
    assert rendered["entrypoint_num_cpus"] == 12 and rendered["entrypoint_num_gpus"] == 4
    assert rendered["entrypoint_memory"] == int(1.5 * 2**30)
    assert rendered["entrypoint"] == (
        f"cd {tmp_path / 'run'} && exec /venv/bin/python -m torch.distributed.run --standalone "
        "--nproc_per_node=4 -m orchestrator.jobs /runs/r1 --attempt 2"
    )
    assert rendered["runtime_env"]["env_vars"]["ORCH_RUN_ID"] == "r1"
    assert rendered["metadata"] == {"orch_run_id": "r1", "orch_attempt": "2", "orch_run_dir": str(tmp_path / "run")}
    assert "local single-node Ray cluster" in rendered["address"]
    assert fresh.address is None and not (tmp_path / "state").exists() and not (tmp_path / "run").exists()
    one = json.loads(fresh.render(JobSpec("r2", 1, "n", ["python", "x.py"], tmp_path, Resources())))
    assert one["entrypoint"].endswith("exec python x.py") and "entrypoint_num_gpus" not in one
    with pytest.raises(LauncherError, match="multi-node"):
        fresh.render(JobSpec("r3", 1, "n", ["python"], tmp_path, Resources(nodes=2)))


def test_exit_codes_map_to_states(tmp_path: Path, launcher: RayLauncher) -> None:
    specs = {code: job_spec(tmp_path, py(f"print('exit {code}'); raise SystemExit({code})")) for code in (0, 75, 1)}
    ids = {code: launcher.submit(spec) for code, spec in specs.items()}
    assert ids[0] == specs[0].key  # submission_id = the spec key
    wait_for(
        lambda: all(s.state.ended for s in launcher.poll_many([*ids.values()]).values()), 180, "the three jobs to end"
    )
    statuses = launcher.poll_many([*ids.values(), "orch-unknown-a1"])
    assert statuses[ids[0]].state == JobState.COMPLETED and statuses[ids[0]].exit_code == 0
    assert statuses[ids[75]].state == JobState.PREEMPTED and statuses[ids[75]].exit_code == 75
    assert statuses[ids[1]].state == JobState.FAILED and statuses[ids[1]].exit_code == 1
    assert "exit code 1" in (statuses[ids[1]].reason or "")
    assert statuses["orch-unknown-a1"].state == JobState.LOST
    assert launcher.poll("orch-unknown-a2").state == JobState.LOST
    for job_id in ids.values():
        status = statuses[job_id]
        assert status.host == "127.0.0.1" and status.started_at is not None and status.ended_at is not None
    assert "exit 75" in launcher.logs(ids[75])


def test_interrupted_result_file_means_preempted_without_exit_75(tmp_path: Path, launcher: RayLauncher) -> None:
    """A wrapper (torchrun) may turn the worker's 75 into 1: the worker's result file still tells."""
    spec = job_spec(tmp_path, [])
    code = (
        "import json, pathlib, sys\n"
        f"pathlib.Path({str(spec.workdir / 'result-1.json')!r}).write_text(json.dumps({{'status': 'interrupted'}}))\n"
        "sys.exit(1)\n"
    )
    spec = JobSpec(spec.job_id, 1, "test", py(code), spec.workdir, SMALL)
    job_id = launcher.submit(spec)
    status = wait_for(lambda: ended(launcher, job_id), 120, "the job to end")
    assert status.state == JobState.PREEMPTED and status.exit_code == 1


def test_submit_is_idempotent_on_the_key(tmp_path: Path, launcher: RayLauncher) -> None:
    spec = job_spec(tmp_path, py("import time; time.sleep(1)"))
    job_id = launcher.submit(spec)
    assert launcher.submit(spec) == job_id
    # another service process pointed at the same cluster finds the job instead of starting a second one
    other = RayLauncher(launcher.address, tmp_path / "other-state")
    assert other.submit(spec) == job_id
    wait_for(lambda: ended(launcher, job_id), 120, "the job to end")
    assert other.submit(spec) == job_id
    assert len([j for j in other._client().list_jobs() if j.submission_id == spec.key]) == 1


def test_a_restarted_service_adopts_the_cluster_it_left_running(launcher: RayLauncher) -> None:
    successor = RayLauncher(None, launcher.state_dir)  # same state folder, no address: like a restarted service
    assert successor.ensure_cluster() == launcher.address
    assert successor.poll("orch-unknown-a1").state == JobState.LOST


def test_cancel_ends_cancelled_within_30_s(tmp_path: Path, launcher: RayLauncher) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"  # like the trainer: checkpoint, exit 75
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    spec = job_spec(tmp_path, py(code))
    job_id = launcher.submit(spec)
    wait_for(lambda: "started" in launcher.logs(job_id), 120, "the job's first output")
    assert launcher.poll(job_id).state == JobState.RUNNING
    launcher.cancel(job_id)
    status = wait_for(lambda: ended(launcher, job_id), 30, "CANCELLED")
    assert status.state == JobState.CANCELLED, status
    launcher.cancel(job_id)  # harmless once ended
    launcher.cancel("orch-unknown-a1")


def test_the_real_worker_trains_a_micro_run_to_completion(tmp_path: Path, launcher: RayLauncher) -> None:
    epochs = 2
    with report_sink() as sink:
        run_dir = make_run_dir(tmp_path / "run", sink.url, "ray", epochs)
        argv = [sys.executable, "-m", "orchestrator.jobs", str(run_dir), "--attempt", "1"]
        spec = JobSpec(run_dir.name, 1, "micro", argv, run_dir, Resources(cpus_per_task=1, mem_gb=3))
        job_id = launcher.submit(spec)
        status = wait_for(lambda: ended(launcher, job_id), 600, "the run to end")
        assert status.state == JobState.COMPLETED, (status, launcher.logs(job_id))
        result = read_result(run_dir, 1)
        assert result is not None and result.status == "completed"
        assert result.iteration == epochs * ITERS_PER_EPOCH
        assert (
            result.checkpoint
            and Path(result.checkpoint).exists()
            and result.manifest
            and Path(result.manifest).exists()
        )
        assert {"start", "checkpoint", "end"} <= set(sink.kinds())


def test_the_ports_of_a_local_cluster_are_distinct() -> None:
    """Probed one at a time, a released port could be handed out twice, and Ray then refused to start
    ("dashboard_agent_http is trying to use a port number ... used by other components")."""
    for _ in range(20):
        ports = _free_ports(11)
        assert len(set(ports)) == 11 and all(1024 <= p <= 65535 for p in ports)
