"""`submit --follow` / `runs follow` logic against a scripted client: it follows the run, then the evaluations
the run triggered, and rides out a service restart."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from api.shell.cli import follow_run
from api.shell.client import ApiError


def evaluation(status: str) -> dict[str, Any]:
    return {
        "id": "e1",
        "status": status,
        "benchmark": "knn",
        "benchmark_version": "1",
        "checkpoint_epoch": 2,
        "metrics": {"knn/top1_k20": 61.5} if status == "succeeded" else {},
        "error": None,
    }


class ScriptedClient:
    """Answers like the REST API would while a run trains, succeeds, and its evaluation runs."""

    def __init__(self) -> None:
        self.runs: Iterator[dict[str, Any] | ApiError] = iter(
            [
                {"status": "queued", "progress": {}},
                ApiError(0, "cannot reach the service"),  # restarting: keep following
                {"status": "running", "progress": {"iteration": 8, "total_iterations": 16}},
                {"status": "succeeded", "status_reason": "training completed", "progress": {"iteration": 16}},
            ]
        )
        self.evaluations: Iterator[list[dict[str, Any]]] = iter(
            [[evaluation("queued")], [evaluation("running")], [evaluation("succeeded")]]
        )
        self.evaluation_polls = 0

    def run(self, run_id: str) -> dict[str, Any]:
        answer = next(self.runs)
        if isinstance(answer, ApiError):
            raise answer
        return {"id": run_id, "mlflow_url": None, "mlflow_run_id": "m1", **answer}

    def run_evaluations(self, run_id: str) -> list[dict[str, Any]]:
        self.evaluation_polls += 1
        return next(self.evaluations)

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return [{"id": "c" * 36, "epoch": 2, "step": 16, "path": "/runs/r/train/checkpoint0001.pth"}]


def test_follow_waits_for_the_run_then_for_the_evaluations_it_triggered(capsys: pytest.CaptureFixture[str]) -> None:
    client = ScriptedClient()
    final = follow_run(client, "r1", poll_s=0.0)  # type: ignore[arg-type]
    assert final["status"] == "succeeded" and client.evaluation_polls == 3
    assert [e["status"] for e in final["evaluations"]] == ["succeeded"]
    err = capsys.readouterr().err
    assert "None" not in err.replace("MLflow run id", "")  # no "0/None" while the total is unknown
    assert "checkpoint " + "c" * 36 in err and "knn" in err and "top1_k20=61.50" in err


def test_follow_of_a_failed_run_does_not_wait_for_evaluations() -> None:
    client = ScriptedClient()
    client.runs = iter([{"status": "failed", "status_reason": "boom", "progress": {}}])
    final = follow_run(client, "r1", quiet=True, poll_s=0.0)  # type: ignore[arg-type]
    assert final["status"] == "failed" and final["evaluations"] == [] and client.evaluation_polls == 0
