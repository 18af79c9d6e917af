"""Runs submitted over REST to the service, on the real single-node SLURM cluster and a real local Ray
cluster: success with checkpoints, cancel within 30 s, and a SLURM preemption that comes back as attempt 2."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.shell.embedded import EmbeddedService
from tests.support import MICRO, auth, body, free_port, get, make_settings, settled, status_of, submit, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]  # real SLURM and Ray clusters train micro runs

SLURM_RESOURCES = {"cpus_per_task": 1, "mem_gb": 2, "time_min": 20}


@pytest.fixture(scope="module")
def slurm_up() -> None:
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if probe.returncode != 0 or not any(state in probe.stdout for state in ("idle", "mixed", "allocated")):
        raise RuntimeError(f"no SLURM cluster answers (run scripts/services.sh start): {probe.stderr.strip()}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}", max_requeues=2)
    with EmbeddedService(settings, port=free_port()) as svc:
        yield svc


def test_slurm_run_succeeds_with_checkpoints(service: EmbeddedService, slurm_up: None) -> None:
    run = submit(service.url, {**body(launcher="slurm"), "resources": SLURM_RESOURCES})
    final = settled(service.url, f"/runs/{run['id']}", 600)
    assert final["status"] == "succeeded", final["status_reason"]
    attempt = final["attempts"][0]
    assert attempt["backend"] == "slurm" and attempt["backend_job_id"].isdigit() and attempt["exit_code"] == 0
    sacct = subprocess.run(
        ["sacct", "-n", "-X", "-j", attempt["backend_job_id"], "-o", "State"], capture_output=True, text=True
    ).stdout
    assert "COMPLETED" in sacct
    epochs = sorted(
        c["epoch"] for c in get(service.url, f"/runs/{run['id']}/checkpoints") if "checkpoint0" in c["path"]
    )
    assert epochs == [1, 2]


def test_slurm_cancel_ends_cancelled_within_30_seconds(service: EmbeddedService, slurm_up: None) -> None:
    run = submit(service.url, {**body("optim.epochs=60", launcher="slurm"), "resources": SLURM_RESOURCES})
    wait_for(lambda: status_of(service.url, run["id"]) == "running", 300, "the SLURM job to run")
    response = httpx.post(f"{service.url}/api/v1/runs/{run['id']}/cancel", headers=auth(), timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    job_id = response.json()["attempts"][-1]["backend_job_id"]

    def slurm_says_cancelled() -> bool:
        out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        return "CANCELLED" in out.stdout

    wait_for(slurm_says_cancelled, 30, "SLURM to report the job CANCELLED")
    wait_for(
        lambda: get(service.url, f"/runs/{run['id']}")["attempts"][-1]["state"] == "ended",
        30,
        "the attempt to be closed",
    )
    assert status_of(service.url, run["id"]) == "cancelled"


def test_slurm_preemption_comes_back_as_attempt_2_and_finishes(service: EmbeddedService, slurm_up: None) -> None:
    # 40 epochs of 8 steps (about 40 s): the requeue must land mid-run, not as the last epoch ends
    run = submit(service.url, {**body("optim.epochs=40", launcher="slurm"), "resources": SLURM_RESOURCES})
    wait_for(
        lambda: status_of(service.url, run["id"]) == "running" and get(service.url, f"/runs/{run['id']}/checkpoints"),
        300,
        "the SLURM job to checkpoint",
    )
    job_id = get(service.url, f"/runs/{run['id']}")["attempts"][0]["backend_job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # the preemption SLURM itself performs
    final = settled(service.url, f"/runs/{run['id']}", 600)
    assert final["status"] == "succeeded", final["status_reason"]
    numbers = [a["number"] for a in final["attempts"]]
    assert numbers == [1, 2] and {a["backend_job_id"] for a in final["attempts"]} == {job_id}
    run_dir = Path(final["output_dir"]).parent
    first = json.loads((run_dir / "result-1.json").read_text())
    second = json.loads((run_dir / "result-2.json").read_text())
    assert first["status"] == "interrupted" and second["status"] == "completed" and second["iteration"] == 40 * 8
    statuses = [e["to_status"] for e in get(service.url, f"/runs/{run['id']}/events")["items"] if e["to_status"]]
    assert statuses[-1] == "succeeded" and "requeued" in statuses and statuses.count("running") == 2


def test_ray_run_succeeds_with_checkpoints(service: EmbeddedService) -> None:
    run = submit(service.url, {**body(launcher="ray"), "resources": {"cpus_per_task": 1, "mem_gb": 2}})
    final = settled(service.url, f"/runs/{run['id']}", 600)
    assert final["status"] == "succeeded", final["status_reason"]
    attempt = final["attempts"][0]
    assert (
        attempt["backend"] == "ray"
        and attempt["backend_job_id"].startswith("orch-")
        and attempt["exit_code"] in (0, None)
    )
    epochs = sorted(
        c["epoch"] for c in get(service.url, f"/runs/{run['id']}/checkpoints") if "checkpoint0" in c["path"]
    )
    assert epochs == [1, 2]


def test_a_sweep_on_slurm_goes_out_as_one_array_and_each_task_requeues_alone(
    service: EmbeddedService, slurm_up: None
) -> None:
    """2 arms x 2 seeds: one `sbatch --array=0-3%2`; a task preempted by `scontrol requeue` comes back as
    attempt 2 of its own trial while the other trials keep their single attempt."""
    spec = {
        "name": "slurm-array",
        "base": {"preset": "tiny_cpu", "overrides": [*MICRO, "optim.epochs=3"]},
        "arms": {"list": [{"name": "dino", "overrides": ["method=dino"]}, {"name": "selfpatch"}]},
        "seeds": 2,
        "metrics": {"primary": "knn/top1_k20"},
        "launcher": "slurm",
        "resources": SLURM_RESOURCES,
        "max_concurrent": 2,
    }
    response = httpx.post(f"{service.url}/api/v1/sweeps", json=spec, headers=auth(), timeout=60)
    assert response.status_code == 201, response.text
    sweep = response.json()["sweep"]

    def trials() -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = get(service.url, f"/sweeps/{sweep['id']}/runs")
        return runs

    def sent() -> list[dict[str, Any]] | None:  # attempt rows exist (as intents) before sbatch names the tasks
        runs = trials()
        return runs if runs and all(r["attempts"] and r["attempts"][0]["backend_job_id"] for r in runs) else None

    submitted = wait_for(sent, 120, "the array")
    ids = sorted(r["attempts"][0]["backend_job_id"] for r in submitted)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(4)]  # one array, one task per trial
    throttle = subprocess.run(["scontrol", "show", "job", array], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=2" in throttle
    first = next(r for r in submitted if r["attempts"][0]["backend_job_id"] == f"{array}_0")
    wait_for(lambda: get(service.url, f"/runs/{first['id']}/checkpoints"), 300, "the first task to checkpoint")
    subprocess.run(["scontrol", "requeue", f"{array}_0"], check=True)
    wait_for(lambda: get(service.url, f"/sweeps/{sweep['id']}")["status"] == "completed", 900, "the sweep to complete")
    final = {r["id"]: r for r in trials()}
    assert {r["status"] for r in final.values()} == {"succeeded"}, [r["status_reason"] for r in final.values()]
    assert [a["number"] for a in final[first["id"]]["attempts"]] == [1, 2]
    assert {a["backend_job_id"] for a in final[first["id"]]["attempts"]} == {f"{array}_0"}
    assert all(len(r["attempts"]) == 1 for key, r in final.items() if key != first["id"])
