"""A tiny sweep end to end on the local launcher, through the CLI: 2 arms x 2 seeds of micro runs, a k-NN
evaluation of each final checkpoint, the service killed mid-sweep and `sweep create` run again, then the
records, the MLflow parent and children, and a report whose numbers are scipy's on the same values."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from scipy import stats as scipy_stats

from tests.support import ADMIN, Service, get, tiny_sweep, wait_for

pytestmark = pytest.mark.slow  # real trials and evaluations
CLI = str(Path(sys.executable).parent / "orchestrator")


def cli(service: Service, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**service.env, "ORCH_URL": service.url, "ORCH_TOKEN": ADMIN}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_tiny_sweep_survives_a_killed_service_and_reports_scipys_numbers(tmp_path: Path, mlflow_server: str) -> None:
    spec = tiny_sweep("e2e-tiny")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    service = Service(
        tmp_path / "home",
        f"sqlite:///{tmp_path / 'orch.db'}",
        ORCH_LOCAL_MAX_CONCURRENT="2",
        ORCH_MLFLOW_TRACKING_URI=mlflow_server,
    )
    service.start()
    try:
        dry = cli(service, "sweep", "create", str(sweep_file), "--dry-run")
        assert dry.returncode == 0 and "4 trials" in dry.stdout and "exists: no" in dry.stdout, dry.stderr
        assert get(service.url, "/sweeps")["items"] == []  # the dry run wrote nothing
        created = cli(service, "sweep", "create", str(sweep_file), "--output", "json")
        assert created.returncode == 0, created.stderr
        sweep = json.loads(created.stdout)["sweep"]
        wait_for(lambda: get(service.url, f"/sweeps/{sweep['id']}")["counts"].get("running"), 300, "a trial to run")
        service.kill()  # mid-sweep: trials keep training, detached from the service
        time.sleep(2)
        service.start()
        again = cli(service, "sweep", "create", str(sweep_file), "--output", "json")
        assert again.returncode == 0 and json.loads(again.stdout)["added"] == 0  # nothing duplicated
        followed = cli(service, "sweep", "status", sweep["id"])
        assert followed.returncode == 0 and "seed" in followed.stdout
        final = wait_for(
            lambda: (s := get(service.url, f"/sweeps/{sweep['id']}"))["status"] == "completed" and s,
            900,
            "the sweep to complete",
        )
        runs = get(service.url, f"/sweeps/{sweep['id']}/runs")
        assert len(runs) == 4 and {(r["status"]) for r in runs} == {"succeeded"}
        values = {(c["arm"], c["seed"]): c["primary"] for c in final["trials"]}
        assert all(v is not None and 0 <= v <= 100 for v in values.values()), values

        report = get(service.url, f"/sweeps/{sweep['id']}/report")
        expected = scipy_stats.ttest_rel(
            [values[("selfpatch", 0)], values[("selfpatch", 1)]], [values[("dino", 0)], values[("dino", 1)]]
        )
        comparison = report["primary"]["comparisons"][0]
        if comparison["p"] is not None:  # two equal differences have no t-test, and the report says so
            assert comparison["p"] == pytest.approx(expected.pvalue) and comparison["t"] == pytest.approx(
                expected.statistic
            )
        assert comparison["mean_diff"] == pytest.approx(
            (values[("selfpatch", 0)] + values[("selfpatch", 1)] - values[("dino", 0)] - values[("dino", 1)]) / 2
        )
        assert report["partial"] is False
        markdown = cli(service, "sweep", "report", sweep["id"], "--format", "markdown", "--plots", str(tmp_path / "p"))
        assert markdown.returncode == 0 and "dino" in markdown.stdout and (tmp_path / "p" / "metric.png").is_file()

        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri=mlflow_server)
        parent_id = wait_for(lambda: get(service.url, f"/sweeps/{sweep['id']}")["mlflow_run_id"], 60, "the parent")
        wait_for(lambda: mlflow.get_run(parent_id).info.status == "FINISHED", 120, "the report logged to MLflow")
        parent = mlflow.get_run(parent_id)
        children = mlflow.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50
        )
        assert sorted((c.data.tags["orch.arm"], c.data.tags["orch.seed"]) for c in children) == [
            ("dino", "0"),
            ("dino", "1"),
            ("selfpatch", "0"),
            ("selfpatch", "1"),
        ]
        artifacts = {a.path for a in mlflow.list_artifacts(parent_id)}
        assert {"sweep_report.md", "sweep_report.json", "plots"} <= artifacts
    finally:
        service.stop()
