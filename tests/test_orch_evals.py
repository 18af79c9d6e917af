"""Evaluations triggered by checkpoints: tiny pretraining -> checkpoints -> automatic k-NN and linear
evaluations on the local launcher -> metrics in SQL, MLflow child runs and, for the final checkpoint, tags of
the run's registered backbone; a second trigger computes nothing; a corrupt checkpoint fails its evaluation
clearly and leaves the run intact."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.shell.embedded import EmbeddedService
from orchestrator.jobs.files import job_token
from tests.support import FASHION_MNIST, body, free_port, get, make_settings, post, status_of, submit, wait_for

pytestmark = pytest.mark.slow  # real pretraining and evaluation jobs on the local launcher

SMALL_PROBE = ["max_train_samples=2000", "max_test_samples=500"]
POLICY = {
    "benchmarks": [
        {"benchmark": "knn", "data": str(FASHION_MNIST), "overrides": SMALL_PROBE, "every_n_epochs": 1, "final": False},
        {"benchmark": "linear", "data": str(FASHION_MNIST), "overrides": [*SMALL_PROBE, "epochs=20"], "final": True},
    ]
}


@pytest.fixture
def service(tmp_path: Path, mlflow_server: str) -> Iterator[EmbeddedService]:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}", tracking_uri=mlflow_server)
    with EmbeddedService(settings, port=free_port()) as svc:
        yield svc


def evaluations(url: str, run_id: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = get(url, f"/runs/{run_id}/evaluations")
    return result


def test_checkpoints_trigger_evaluations_recorded_in_sql_and_mlflow(
    service: EmbeddedService,
    mlflow_server: str,
) -> None:
    created = post(service.url, "/experiments", {"name": "evals-e2e", "eval_policy": POLICY})
    assert created.status_code == 201, created.text
    run = submit(service.url, {**body(), "experiment": "evals-e2e"})
    wait_for(lambda: status_of(service.url, run["id"]) == "succeeded", 300, "the pretraining run to succeed")
    done = wait_for(
        lambda: (
            (rows := evaluations(service.url, run["id"]))
            and len(rows) == 3
            and all(r["status"] in ("succeeded", "failed") for r in rows)
            and rows
        ),
        600,
        "the three evaluations to finish",
    )
    assert isinstance(done, list)
    assert all(r["status"] == "succeeded" for r in done), [(r["benchmark"], r["error"]) for r in done]
    knn = sorted((r for r in done if r["benchmark"] == "knn"), key=lambda r: r["checkpoint_epoch"])
    linear = [r for r in done if r["benchmark"] == "linear"]
    assert [r["checkpoint_epoch"] for r in knn] == [1, 2] and [r["trigger"] for r in knn] == ["policy:every_n"] * 2
    assert len(linear) == 1 and linear[0]["checkpoint_epoch"] == 2 and linear[0]["trigger"] == "policy:final"
    for r in knn:
        assert 0.0 <= r["metrics"]["knn/top1_k20"] <= 100.0 and r["benchmark_version"] and len(r["config_hash"]) == 64
    assert 0.0 <= linear[0]["metrics"]["linear/top1"] <= 100.0

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_server)
    parent = get(service.url, f"/runs/{run['id']}")["mlflow_run_id"]
    for r in done:
        child = mlflow.get_run(r["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent and child.info.run_name == f"eval/{r['benchmark']}"
        assert child.data.tags["orch.ckpt_sha256"] == r["checkpoint_sha256"] and child.info.status == "FINISHED"
        name = "eval/knn/top1_k20" if r["benchmark"] == "knn" else "eval/linear/top1"
        assert child.data.metrics[name] == pytest.approx(r["metrics"][name.removeprefix("eval/")])

    # the final checkpoint's evaluations are tags of the run's registered backbone, whichever finished first
    (version,) = mlflow.search_model_versions(f"run_id = '{parent}'")
    assert version.name == "evals-e2e-selfpatch" and version.tags["orch.ckpt_sha256"] == knn[1]["checkpoint_sha256"]
    assert float(version.tags["eval/knn/top1_k20"]) == pytest.approx(knn[1]["metrics"]["knn/top1_k20"])
    assert float(version.tags["eval/linear/top1"]) == pytest.approx(linear[0]["metrics"]["linear/top1"])

    # asking again for an evaluation that exists computes nothing: same record, no new row, no new job
    spec = {"benchmark": "knn", "data": str(FASHION_MNIST), "overrides": SMALL_PROBE}
    jobs_before = len(list((Path(service.settings.home).resolve() / "local-eval-jobs").glob("*.json")))
    again = post(service.url, f"/checkpoints/{knn[0]['checkpoint_id']}/evaluations", spec)
    assert again.status_code == 200 and again.json()["id"] == knn[0]["id"] and again.json()["status"] == "succeeded"
    assert len(evaluations(service.url, run["id"])) == 3
    time.sleep(3)  # several reconciler passes (0.5 s apart): none may launch a job for the duplicate request
    assert len(list((Path(service.settings.home).resolve() / "local-eval-jobs").glob("*.json"))) == jobs_before

    table = get(
        service.url, f"/evaluations/compare?checkpoint={knn[0]['checkpoint_id']}&checkpoint={knn[1]['checkpoint_id']}"
    )
    assert set(table["metrics"]["knn/top1_k20"]) == {knn[0]["checkpoint_id"], knn[1]["checkpoint_id"]}
    assert table["metrics"]["knn/top1_k20"][knn[1]["checkpoint_id"]] == knn[1]["metrics"]["knn/top1_k20"]
    assert table["metrics"]["linear/top1"][knn[0]["checkpoint_id"]] is None  # not evaluated there


def test_corrupt_checkpoint_fails_its_evaluation_clearly_and_the_run_stays_intact(service: EmbeddedService) -> None:
    run = submit(service.url, {**body(), "experiment": "evals-corrupt"})
    wait_for(lambda: status_of(service.url, run["id"]) == "succeeded", 300, "the pretraining run to succeed")
    bad = Path(run["output_dir"]) / "checkpoint9999.pth"
    bad.write_bytes(b"PK\x03\x04 truncated and corrupt")
    report = {
        "kind": "checkpoint",
        "attempt": 1,
        "path": str(bad),
        "epoch": 99,
        "iteration": 9999,
        "sha256": hashlib.sha256(bad.read_bytes()).hexdigest(),
        "checkpoint_kind": "epoch",
    }
    token = job_token(service.settings.secret, run["id"])
    assert post(service.url, f"/runs/{run['id']}/reports", report, token).status_code == 204
    checkpoint = next(c for c in get(service.url, f"/runs/{run['id']}/checkpoints") if c["path"] == str(bad))
    spec = {"benchmark": "knn", "data": str(FASHION_MNIST), "overrides": SMALL_PROBE, "max_attempts": 1}
    created = post(service.url, f"/checkpoints/{checkpoint['id']}/evaluations", spec)
    assert created.status_code == 202
    final = wait_for(
        lambda: (e := get(service.url, f"/evaluations/{created.json()['id']}"))["status"] == "failed" and e,
        300,
        "the evaluation of the corrupt checkpoint to fail",
    )
    assert isinstance(final, dict)
    assert "corrupt" in final["error"] and "\n" not in final["error"] and len(final["attempts"]) == 1
    after = get(service.url, f"/runs/{run['id']}")
    assert after["status"] == "succeeded" and after["status_reason"] == "training completed"
    bad_request = post(service.url, f"/checkpoints/{checkpoint['id']}/evaluations", {**spec, "config": "huge"})
    assert bad_request.status_code == 422 and bad_request.json()["errors"][0]["field"] == "config"
