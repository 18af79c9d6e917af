"""A search on the real local Ray cluster, through the service: Ray Tune samples 4 trials (a grid over the
SelfPatch loss weight), ASHA stops the poor ones early with its reason, every trial is a run of the sweep
with its MLflow run and checkpoints; the search job is killed mid-trial and its retry continues the Tune
experiment with `Tuner.restore`, without a duplicate trial, the interrupted trial resuming from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.shell.embedded import EmbeddedService
from tests.support import MICRO, auth, free_port, get, make_settings, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]  # a real Ray cluster trains micro runs

LAMBDAS = [0.1, 1.0, 2.0, 4.0]  # at epoch 1 the total loss grows with the patch-loss weight: ASHA stops 1.0-4.0
SEARCH: dict[str, Any] = {
    "name": "lambda-asha",
    # epochs of a few seconds, so that ASHA's decision reaches a trial before its run has finished
    "base": {"preset": "tiny_cpu", "overrides": [*MICRO, "optim.epochs=3", "data.max_samples=1024"]},
    "search": {
        "space": {"selfpatch.loss_weight": {"grid": LAMBDAS}},
        "num_samples": 1,
        "scheduler": "asha",
        "asha": {"grace_period": 1, "reduction_factor": 2},
    },
    "metrics": {"primary": "train/loss", "direction": "min"},
    "max_concurrent": 1,
}


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    settings = make_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'orch.db'}")
    with EmbeddedService(settings, port=free_port()) as svc:
        yield svc


def _kill_driver(folder: str) -> int:
    """SIGKILL the search job's process (the Ray job's driver), found by its command line."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.jobs" in cmdline and folder.encode() in cmdline:
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
    return killed


def _story(runs: list[dict[str, Any]]) -> str:
    """Each trial in the order it started: its weight, status, attempts and reason (a failure's evidence)."""
    lines = []
    for run in sorted(runs, key=lambda r: min(str(a.get("started_at") or "") for a in r["attempts"] or [{}])):
        attempts = [(a["number"], a.get("started_at"), a.get("ended_at")) for a in run["attempts"]]
        lines.append(f"{run['config']['selfpatch']['loss_weight']}: {run['status']} {attempts} {run['status_reason']}")
    return "\n".join(lines)


def test_a_ray_tune_search_stops_trials_early_and_survives_a_killed_driver(service: EmbeddedService) -> None:
    response = httpx.post(f"{service.url}/api/v1/sweeps", json=SEARCH, headers=auth(), timeout=60)
    assert response.status_code == 201, response.text
    sweep = response.json()["sweep"]
    search = sweep["search"]

    def first_trial_mid_run() -> Any:
        state = get(service.url, f"/sweeps/{sweep['id']}")
        cells = [c for c in state["trials"] if c["status"] == "running" and c["primary"] is not None]
        return cells[0] if cells else None

    try:
        trial = wait_for(first_trial_mid_run, 600, "a trial to report its first epoch")
    except AssertionError as exc:  # the evidence of a search that never got going: its state and driver log
        state = get(service.url, f"/sweeps/{sweep['id']}")
        driver = httpx.get(f"{service.url}/api/v1/searches/{search['id']}/logs", headers=auth(), timeout=60).text
        raise AssertionError(f"{exc}\nsweep: {state}\nsearch driver log (tail):\n{driver[-6000:]}") from exc
    experiment = Path(service.settings.home).resolve() / "sweeps" / sweep["id"] / "tune"

    def saved_with_the_trial() -> bool:  # Tune's experiment state already knows the running trial
        return any(trial["arm"] in p.read_text(errors="replace") for p in experiment.glob("experiment_state*.json"))

    wait_for(saved_with_the_trial, 120, "Tune to save its experiment state")
    rungs = experiment.parent / "asha-rungs.json"

    def asha_recorded_an_epoch() -> bool:  # written atomically by the search's ASHA after each result
        return rungs.is_file() and any(recorded for _, recorded in json.loads(rungs.read_text())["brackets"][0])

    wait_for(asha_recorded_an_epoch, 120, "ASHA to record the first epoch")
    assert get(service.url, f"/searches/{search['id']}")["attempts"][0]["backend"] == "ray"
    search_folder = str(Path(service.settings.home).resolve() / "searches" / search["id"])
    assert _kill_driver(search_folder) == 1

    final = wait_for(
        lambda: (s := get(service.url, f"/sweeps/{sweep['id']}"))["status"] == "completed" and s,
        900,
        "the restored search to complete",
    )
    attempts = get(service.url, f"/searches/{search['id']}")["attempts"]
    assert len(attempts) == 2 and final["search"]["status"] == "succeeded", final["search"]
    runs = get(service.url, f"/sweeps/{sweep['id']}/runs")
    assert len(runs) == 4 and len({r["id"] for r in runs}) == 4  # no duplicate trial after the restore
    by_lambda = {r["config"]["selfpatch"]["loss_weight"]: r for r in runs}
    assert sorted(by_lambda) == LAMBDAS
    best = by_lambda[0.1]
    assert best["status"] == "succeeded", best["status_reason"]
    assert [a["number"] for a in best["attempts"]] == [1, 2]  # killed mid-run, resumed from its checkpoint
    # Which trials ASHA stops depends on the order they reach the rung (a restore may reorder pending trials),
    # so each stop is checked against its own reason: the trial's loss was worse than the rung's cutoff.
    # The rungs survive the restore with the best trial's first epoch in them, so whichever trial reaches
    # the first rung next is stopped: at least one stop, never the best.
    stopped = [r for r in runs if r["status"] == "stopped"]
    assert len(stopped) >= 1 and {r["status"] for r in runs} == {"succeeded", "stopped"}, _story(runs)
    for run in stopped:
        reason = run["status_reason"]
        found = re.search(r"after epoch [12] of 3: train/loss = ([\d.]+), worse than the cutoff ([\d.]+)", reason)
        assert found is not None and float(found[1]) > float(found[2]), reason
        assert run["config"]["selfpatch"]["loss_weight"] > 0.1  # never the best weight
    for run in runs:
        assert run["mlflow_run_id"] and get(service.url, f"/runs/{run['id']}/checkpoints")
    report = get(service.url, f"/sweeps/{sweep['id']}/report")
    assert report["kind"] == "search" and report["best"]["params"] == {"selfpatch.loss_weight": 0.1}
    assert report["best"]["epochs"] == 3 and [t["status"] for t in report["trials"]].count("stopped") == len(stopped)
    plot = httpx.get(f"{service.url}/api/v1/sweeps/{sweep['id']}/plots/curves.png", headers=auth(), timeout=60)
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
