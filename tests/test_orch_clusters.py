"""Runs submitted over REST to the service, on the real single-node SLURM cluster and a real local Ray
cluster: success with checkpoints, cancel within 30 s, and a SLURM preemption that comes back as attempt 2."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.shell.embedded import EmbeddedService
from tests.support import auth, body, free_port, get, make_settings, settled, status_of, submit, wait_for

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
    run = submit(service.url, {**body("optim.epochs=10", launcher="slurm"), "resources": SLURM_RESOURCES})
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
    assert first["status"] == "interrupted" and second["status"] == "completed" and second["iteration"] == 10 * 8
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
