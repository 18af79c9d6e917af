"""End to end on the local launcher: REST submit -> job -> checkpoints -> MLflow (a real server), plus
cancel, preemption with requeue, a job that dies silently, and a service killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.shell.embedded import EmbeddedService
from tests.support import ADMIN, REPO, auth, body, free_port, get, make_settings, status_of, submit, wait_for

pytestmark = pytest.mark.slow  # real jobs train on the local launcher


@pytest.fixture
def service(tmp_path: Path, mlflow_server: str) -> Iterator[EmbeddedService]:
    settings = make_settings(
        tmp_path / "home",
        f"sqlite:///{tmp_path / 'orch.db'}",
        tracking_uri=mlflow_server,
        mlflow_ui_url=mlflow_server,
        max_requeues=2,
    )
    with EmbeddedService(settings, port=free_port()) as svc:
        yield svc


def test_local_run_succeeds_with_checkpoints_and_one_mlflow_run(service: EmbeddedService, mlflow_server: str) -> None:
    run = submit(service.url, body())
    final = wait_for(
        lambda: status_of(service.url, run["id"]) in ("succeeded", "failed") and get(service.url, f"/runs/{run['id']}"),
        300,
        "the run to end",
    )
    assert isinstance(final, dict)
    assert final["status"] == "succeeded", final["status_reason"]
    attempts = final["attempts"]
    assert len(attempts) == 1 and attempts[0]["exit_code"] == 0 and attempts[0]["state"] == "ended"
    checkpoints = get(service.url, f"/runs/{run['id']}/checkpoints")
    numbered = sorted(
        c["epoch"] for c in checkpoints if c["path"].endswith(("checkpoint0000.pth", "checkpoint0001.pth"))
    )
    assert numbered == [1, 2] and all(len(c["sha256"]) == 64 for c in checkpoints)
    transitions = [
        (e["from_status"], e["to_status"])
        for e in get(service.url, f"/runs/{run['id']}/events")["items"]
        if e["kind"] == "transition"
    ]
    assert transitions == [
        (None, "queued"),
        ("queued", "submitted"),
        ("submitted", "running"),
        ("running", "succeeded"),
    ]

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = mlflow.get_run(final["mlflow_run_id"]).info.experiment_id
    assert final["mlflow_url"] == f"{mlflow_server}/#/experiments/{experiment_id}/runs/{final['mlflow_run_id']}"
    mlrun = mlflow.get_run(final["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["orch.run_id"] == run["id"] and mlrun.data.tags["orch.config_hash"] == run["config_hash"]
    assert mlrun.data.tags["orch.attempt"] == "1" and mlrun.data.tags["orch.local_job_id"].startswith("orch-")
    assert {"train/loss", "train/lr", "train/patch_loss", "epoch"} <= set(mlrun.data.metrics)
    assert mlrun.data.params["selfpatch.k"] == "4"
    history = mlflow.get_metric_history(final["mlflow_run_id"], "train/loss")
    assert history and max(m.step for m in history) == 16
    artifacts = {a.path for a in mlflow.list_artifacts(final["mlflow_run_id"])}
    assert artifacts == {"config.yaml", "export", "checkpoints.json"}  # checkpoints are linked, not copied
    exported = {a.path for a in mlflow.list_artifacts(final["mlflow_run_id"], "export")}
    assert {"export/manifest.json", "export/backbone.safetensors", "export/aggregation.safetensors"} <= exported
    (version,) = mlflow.search_model_versions(f"run_id = '{final['mlflow_run_id']}'")
    assert version.name == "e2e-selfpatch" and version.source == f"runs:/{final['mlflow_run_id']}/export"
    assert version.tags["orch.config_hash"] == run["config_hash"] and version.tags["orch.run_id"] == run["id"]
    logs = httpx.get(f"{service.url}/api/v1/runs/{run['id']}/logs", headers=auth(), timeout=30).text
    assert "done" in logs or "iteration" in logs
    assert "HTTP Request" not in logs  # the job's log is about the job, not its report requests


def _job_pids(service: EmbeddedService, run_id: str) -> list[int]:
    """The local job's supervisor pid (its process group) from the launcher's state file."""
    state = Path(service.settings.home).resolve() / "local-jobs"
    metas = [json.loads(p.read_text()) for p in state.glob(f"orch-{run_id}-a*.json")]
    return [int(m["pid"]) for m in metas]


def _wait_running_with_checkpoint(service: EmbeddedService, run_id: str) -> None:
    wait_for(
        lambda: status_of(service.url, run_id) == "running" and get(service.url, f"/runs/{run_id}/checkpoints"),
        300,
        "the run to be running with a checkpoint",
    )


def test_cancel_stops_the_job(service: EmbeddedService) -> None:
    run = submit(service.url, body("optim.epochs=60"))
    _wait_running_with_checkpoint(service, run["id"])
    response = httpx.post(f"{service.url}/api/v1/runs/{run['id']}/cancel", headers=auth(), timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_for(
        lambda: get(service.url, f"/runs/{run['id']}")["attempts"][-1]["state"] == "ended",
        60,
        "the cancelled job's attempt to end",
    )
    pid = _job_pids(service, run["id"])[0]

    def gone() -> bool:  # the supervisor writes the exit status just before it exits itself
        stat = Path(f"/proc/{pid}/stat")
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

    wait_for(gone, 30, "the job's process to exit")
    assert status_of(service.url, run["id"]) == "cancelled"  # terminal: the job's end changes nothing


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(
    service: EmbeddedService,
    mlflow_server: str,
) -> None:
    run = submit(service.url, body("optim.epochs=12"))
    _wait_running_with_checkpoint(service, run["id"])
    os.killpg(_job_pids(service, run["id"])[0], signal.SIGTERM)  # what a cluster does on preemption
    final = wait_for(
        lambda: status_of(service.url, run["id"]) in ("succeeded", "failed") and get(service.url, f"/runs/{run['id']}"),
        600,
        "the requeued run to end",
    )
    assert isinstance(final, dict) and final["status"] == "succeeded", final["status_reason"]
    assert [a["number"] for a in final["attempts"]] == [1, 2] and final["requeues"] == 1
    assert final["attempts"][0]["exit_code"] == 75
    statuses = [e["to_status"] for e in get(service.url, f"/runs/{run['id']}/events")["items"] if e["to_status"]]
    assert statuses == ["queued", "submitted", "running", "preempted", "requeued", "running", "succeeded"]
    run_dir = Path(final["output_dir"]).parent
    first = json.loads((run_dir / "result-1.json").read_text())
    second = json.loads((run_dir / "result-2.json").read_text())
    assert first["status"] == "interrupted" and 0 < first["iteration"] < 12 * 8
    assert second["status"] == "completed" and second["iteration"] == 12 * 8
    assert "resumed from" in (run_dir / "logs" / "attempt-2.log").read_text()

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    same = mlflow.search_runs(
        [mlflow.get_run(final["mlflow_run_id"]).info.experiment_id], f"tags.`orch.run_id` = '{run['id']}'"
    )
    assert [r.info.run_id for r in same] == [final["mlflow_run_id"]]  # the requeued attempt continued it
    assert same[0].data.tags["orch.attempt"] == "2" and same[0].info.status == "FINISHED"
    assert max(m.step for m in mlflow.get_metric_history(final["mlflow_run_id"], "train/loss")) == 12 * 8


def test_a_job_that_dies_silently_is_never_a_success(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}", max_requeues=0)
    with EmbeddedService(settings, port=free_port()) as svc:
        run = submit(svc.url, body("optim.epochs=60"))
        _wait_running_with_checkpoint(svc, run["id"])
        os.killpg(_job_pids(svc, run["id"])[0], signal.SIGKILL)  # no checkpoint, no exit status, no report
        final = wait_for(
            lambda: status_of(svc.url, run["id"]) in ("succeeded", "failed") and get(svc.url, f"/runs/{run['id']}"),
            120,
            "the lost run to be settled",
        )
    assert isinstance(final, dict) and final["status"] == "failed"
    assert "without an exit status" in final["status_reason"] and "gave up after 0 requeues" in final["status_reason"]


def test_service_killed_mid_run_catches_up_after_restart(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "ORCH_HOME": str(home),
        "ORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'orch.db'}",
        "ORCH_ADMIN_TOKENS": f"admin:{ADMIN}",
        "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "ORCH_RECONCILE_INTERVAL_S": "0.5",
        "ORCH_API_URL": f"http://127.0.0.1:{port}",
    }
    cli = [str(Path(sys.executable).parent / "orchestrator"), "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cli, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(lambda: _ready(url), 60, "the service to be ready")
        return proc

    service = start()
    try:
        run = submit(url, body("optim.epochs=12"))
        wait_for(lambda: status_of(url, run["id"]) == "running", 300, "the run to start")
        service.kill()  # SIGKILL: no shutdown, no flush
        service.wait(timeout=30)
        time.sleep(10)  # the job trains on and its reports fail meanwhile
        service = start()
        final = wait_for(
            lambda: status_of(url, run["id"]) in ("succeeded", "failed") and get(url, f"/runs/{run['id']}"),
            600,
            "the run to end after the restart",
        )
        assert isinstance(final, dict) and final["status"] == "succeeded", final["status_reason"]
        epochs = sorted(c["epoch"] for c in get(url, f"/runs/{run['id']}/checkpoints") if "checkpoint0" in c["path"])
        assert epochs == list(range(1, 13))  # every numbered checkpoint, including those reported while down
        assert len(final["attempts"]) == 1
    finally:
        service.terminate()
        service.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
