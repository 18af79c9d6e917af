"""Search sweeps without Ray: the spec, the trial registration and its trust boundary, the mailbox through
which a search's Tune trials are launched and followed (the real `tune` launcher on files), the `stopped`
end of a trial ASHA stops early, the search report, and the job runner ending `stopped` on a stop request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.db.models import Search, Sweep, Trial
from orchestrator.errors import ConflictError, InvalidInputError
from orchestrator.jobs.files import EXIT_COMPLETED, JobFile, read_result, request_stop
from orchestrator.launchers.tune import attempt_path, closed_path, launch_path, mailbox, write_attempt
from orchestrator.sweeps.search import TrialRegistration, read_search_metrics, register_trial, search_of
from orchestrator.sweeps.service import cancel_sweep, create_sweep, report_for, report_plots, retry_failed
from orchestrator.sweeps.spec import load_spec
from tests.harness import Harness
from tests.support import MICRO

SEARCH: dict[str, Any] = {
    "name": "lambda-search",
    "base": {"preset": "tiny_cpu", "overrides": [*MICRO, "optim.epochs=3"]},
    "search": {
        "space": {"selfpatch.loss_weight": {"grid": [0.1, 1.0, 4.0]}, "optim.lr": {"loguniform": [1e-5, 1e-3]}},
        "num_samples": 1,
        "asha": {"grace_period": 1, "reduction_factor": 2},
    },
    "metrics": {"primary": "train/loss", "direction": "min"},
    "max_concurrent": 1,
}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.db.dispose()


def create(h: Harness, **changes: Any) -> Any:
    with h.db.transaction() as session:
        return create_sweep(session, h.settings, load_spec({**SEARCH, **changes}), "alice").sweep.id


def search_id(h: Harness, sweep_id: Any) -> Any:
    with h.db.sessions() as session:
        search = search_of(session, session.get(Sweep, sweep_id))
        assert search is not None
        return search.id


def register(h: Harness, sweep_id: Any, trial: str, **params: Any) -> Any:
    with h.db.transaction() as session:
        search = session.get(Search, search_id(h, sweep_id))
        body = TrialRegistration(tune_trial_id=trial, params=params)
        return register_trial(session, h.settings, search, body, "job:search")


def test_search_files_are_validated_like_run_configs() -> None:
    from trainer.presets import ConfigError

    space = SEARCH["search"]
    for bad, field in (
        ({**SEARCH, "arms": {"list": [{"name": "a"}]}}, ""),
        ({**SEARCH, "metrics": {"primary": "knn/top1_k20"}}, "metrics"),  # no monitor reports a k-NN every epoch
        ({**SEARCH, "seeds": 3}, "seeds"),
        ({**SEARCH, "launcher": "slurm"}, "launcher"),
        ({**SEARCH, "search": {**space, "space": {"optim.lr": {"uniform": [1e-3, 1e-4]}}}}, "search"),
        ({**SEARCH, "search": {**space, "space": {"optim.lr": {"loguniform": [0, 1e-3]}}}}, "search"),
        ({**SEARCH, "search": {**space, "space": {"optim.lr": {"uniform": [0, 1], "choice": [1]}}}}, "search"),
    ):
        with pytest.raises(ConfigError) as refused:
            load_spec(bad)
        assert field in (refused.value.field or "") or field in str(refused.value), (field, refused.value)


def test_creating_a_search_records_one_driver_job_and_no_trials(h: Harness) -> None:
    sweep_id = create(h)
    with h.db.sessions() as session:
        search = session.get(Search, search_id(h, sweep_id))
        assert search is not None and search.status == "queued" and search.launcher == "ray"
        assert session.scalars(select(Trial)).all() == []
    h.tick()
    job = JobFile.read(Path(h.job(search_id(h, sweep_id)).folder))
    assert job.kind == "search" and job.payload["epochs"] == 3 and job.payload["metric"] == "train/loss"
    assert job.payload["trials_path"].endswith(f"/searches/{search_id(h, sweep_id)}/trials")
    with h.db.transaction() as session:
        create_sweep(session, h.settings, load_spec(SEARCH), "alice")  # the same file again: nothing new
        assert len(session.scalars(select(Search)).all()) == 1


def test_a_trial_registers_once_with_values_from_the_space(h: Harness) -> None:
    sweep_id = create(h)
    h.tick()
    first = register(h, sweep_id, "abc_00000", **{"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4})
    again = register(h, sweep_id, "abc_00000", **{"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4})
    assert first.created and not again.created and again.run_id == first.run_id
    trial = h.job(first.run_id)
    assert isinstance(trial, Trial) and trial.launcher == "tune" and trial.arm == "abc_00000"
    assert trial.config["selfpatch"]["loss_weight"] == 0.1 and trial.config["optim"]["lr"] == 1e-4
    for params, field in (
        ({"selfpatch.loss_weight": 0.5, "optim.lr": 1e-4}, "params.selfpatch.loss_weight"),  # not a grid value
        ({"selfpatch.loss_weight": 0.1, "optim.lr": 0.5}, "params.optim.lr"),  # outside the bounds
        ({"selfpatch.loss_weight": 0.1}, "params.optim.lr"),  # missing
        ({"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4, "data.path": "/etc"}, "params.data.path"),  # not searched
    ):
        with pytest.raises(InvalidInputError) as refused:
            register(h, sweep_id, "abc_00001", **params)
        assert refused.value.field == field
    with h.db.sessions() as session:
        assert len(session.scalars(select(Trial)).all()) == 1  # nothing written by the refusals


def _run_trial(h: Harness, run_id: Any, epochs: list[tuple[int, float]], outcome: str, reason: str = "") -> None:
    """What the Tune trainable and the job runner leave in a trial's folder."""
    folder = Path(h.job(run_id).folder)
    assert launch_path(folder, 1).exists()  # the service let attempt 1 go
    write_attempt(folder, 1, "running", started_at=time.time())
    h.tick()
    assert h.job(run_id).status == "running"
    with open(mailbox(folder) / "metrics.jsonl", "a") as handle:
        for epoch, value in epochs:
            handle.write(json.dumps({"epoch": epoch, "value": value}) + "\n")
    (folder / "result-1.json").write_text(json.dumps({"status": outcome, "reason": reason or None}))
    write_attempt(folder, 1, "ended", started_at=time.time(), ended_at=time.time(), exit_code=0)


def test_a_trial_asha_stops_ends_stopped_with_its_reason_and_its_curve(h: Harness) -> None:
    sweep_id = create(h)
    h.tick()
    trial = register(h, sweep_id, "abc_00000", **{"selfpatch.loss_weight": 4.0, "optim.lr": 1e-4})
    h.tick()  # launched through the mailbox
    why = "stopped early by ASHA after epoch 1 of 3: train/loss = 9.1, below the cutoff 8.7 of the rung at epoch 1"
    _run_trial(h, trial.run_id, [(1, 9.1)], "stopped", why)
    h.tick()
    ended = h.job(trial.run_id)
    assert ended.status == "stopped" and ended.status_reason == why
    assert ended.progress["search"]["history"] == [[1, 9.1]] or ended.progress["search"]["history"] == [(1, 9.1)]
    assert h.mlflow.runs[ended.mlflow_run_id] == "FINISHED"  # a stopped trial's curve is a finished result


def test_the_search_report_ranks_trials_and_the_sweep_completes_with_its_search(h: Harness) -> None:
    sweep_id = create(h)
    h.tick()
    good = register(h, sweep_id, "abc_00000", **{"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4})
    bad = register(h, sweep_id, "abc_00001", **{"selfpatch.loss_weight": 4.0, "optim.lr": 1e-4})
    h.tick()
    _run_trial(h, good.run_id, [(1, 5.0), (2, 4.5), (3, 4.2)], "completed")
    (Path(h.job(good.run_id).output_dir)).mkdir(parents=True, exist_ok=True)
    h.final_checkpoint(good.run_id)
    _run_trial(h, bad.run_id, [(1, 9.0)], "stopped", "stopped early by ASHA after epoch 1 of 3")
    h.tick()
    assert [h.job(t.run_id).status for t in (good, bad)] == ["succeeded", "stopped"]
    with h.db.sessions() as session:
        assert session.get(Sweep, sweep_id).status == "active"  # the search job still runs
    search = h.fake.job_of(search_id(h, sweep_id))
    h.fake.finish(search, "completed", metrics={"trials": 2.0})
    h.tick(2)
    with h.db.sessions() as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep.status == "completed"
        report = report_for(session, sweep)
        plots = report_plots(session, sweep, report, h.mlflow)
    assert [r.trial for r in report.ranked()] == ["abc_00000", "abc_00001"] and report.best.trial == "abc_00000"
    assert not report.partial and report.to_json()["best"]["params"] == {"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4}
    markdown = report.to_markdown()
    assert "stopped early by ASHA" in markdown and "| 1 | abc_00000 | succeeded | 3 |" in markdown
    assert set(plots) == {"curves"} and plots["curves"]("png").startswith(b"\x89PNG")
    assert {"sweep_report.md", "plots/curves.png"} <= set(h.mlflow.artifacts[sweep.mlflow_run_id])


def test_cancelling_a_search_closes_the_mailbox_of_trials_that_never_ran(h: Harness) -> None:
    sweep_id = create(h)
    h.tick()
    waiting = register(h, sweep_id, "abc_00000", **{"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4})
    with h.db.transaction() as session:
        cancel_sweep(session, session.get(Sweep, sweep_id), "alice")
    h.tick()
    assert h.job(waiting.run_id).status == "cancelled"
    assert json.loads(closed_path(Path(h.job(waiting.run_id).folder)).read_text())["status"] == "cancelled"
    assert h.job(search_id(h, sweep_id)).status == "cancelled"
    with h.db.transaction() as session:  # a cancelled search is retried by a new search job (Tuner.restore)
        retry_failed(session, h.settings, session.get(Sweep, sweep_id), "alice")
        assert len(session.scalars(select(Search)).all()) == 2
        with pytest.raises(ConflictError):
            retry_failed(session, h.settings, session.get(Sweep, sweep_id), "alice")


def test_a_silent_trial_is_lost_and_requeued(h: Harness) -> None:
    sweep_id = create(h)
    h.tick()
    trial = register(h, sweep_id, "abc_00000", **{"selfpatch.loss_weight": 0.1, "optim.lr": 1e-4})
    h.tick()
    folder = Path(h.job(trial.run_id).folder)
    write_attempt(folder, 1, "running", started_at=time.time())
    h.tick()
    record = json.loads(attempt_path(folder, 1).read_text())
    attempt_path(folder, 1).write_text(json.dumps({**record, "at": time.time() - 3600}))  # its search died
    h.tick(2)
    trial_job = h.job(trial.run_id)
    assert [a.number for a in trial_job.attempts] == [1, 2] and launch_path(folder, 2).exists()


def test_search_metrics_are_parsed_strictly(tmp_path: Path) -> None:
    mailbox(tmp_path).mkdir()
    lines = ['{"epoch": 1, "value": 2.5}', '{"epoch": "2", "value": 1}', '{"epoch": 3, "value": NaN}', "garbage"]
    lines += ['{"epoch": true, "value": 1.0}', '{"epoch": 4, "value": 1.5}', '{"epoch": 5, "val']
    (mailbox(tmp_path) / "metrics.jsonl").write_text("\n".join(lines))
    assert read_search_metrics(tmp_path) == [(1, 2.5), (4, 1.5)]


def test_the_job_runner_ends_stopped_when_asked_to_stop(tmp_path: Path) -> None:
    """The trainer interrupted with a stop request in its folder (what ASHA leaves) ends `stopped`, exit 0."""
    from orchestrator.jobs.train import run
    from tests.launcher_support import make_run_dir

    folder = make_run_dir(tmp_path / "run", "http://127.0.0.1:9", "tune", 2, "stop_at_step=3")
    request_stop(folder, "stopped early by ASHA after epoch 1 of 2")
    code = run(JobFile.read(folder), folder, 1)
    result = read_result(folder, 1)
    assert code == EXIT_COMPLETED and result is not None
    assert result.status == "stopped" and result.reason == "stopped early by ASHA after epoch 1 of 2"


def test_asha_rungs_survive_a_restored_search(tmp_path: Path) -> None:
    """Tune restores trials and the searcher but not the scheduler: the rungs come back from their file, so
    the first trial to reach a rung after a restore is judged against the trials recorded before it."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestrator.jobs.tune_trial import TRIAL_METRIC, ExplainedASHA

    def asha() -> ExplainedASHA:
        kwargs: dict[str, Any] = {"time_attr": "epoch", "max_t": 3, "grace_period": 1, "reduction_factor": 2}
        scheduler = ExplainedASHA("train/loss", rungs_path=str(tmp_path / "rungs.json"), **kwargs)
        scheduler.set_search_properties(TRIAL_METRIC, "min")
        return scheduler

    best, worse = SimpleNamespace(trial_id="best"), SimpleNamespace(trial_id="worse")
    first = asha()
    first.on_trial_add(None, best)
    assert first.on_trial_result(None, best, {"epoch": 1, TRIAL_METRIC: 2.0}) == TrialScheduler.CONTINUE
    saved = json.loads((tmp_path / "rungs.json").read_text())
    assert {"best": -2.0} in [recorded for _, recorded in saved["brackets"][0]]

    restored = asha()  # a new search process: its scheduler starts as Tune pickled it, empty
    for trial in (best, worse):
        restored.on_trial_add(None, trial)
    assert restored.on_trial_result(None, worse, {"epoch": 1, TRIAL_METRIC: 5.0}) == TrialScheduler.STOP
    forgetful = ExplainedASHA("train/loss", time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2)
    forgetful.set_search_properties(TRIAL_METRIC, "min")
    forgetful.on_trial_add(None, worse)
    assert forgetful.on_trial_result(None, worse, {"epoch": 1, TRIAL_METRIC: 5.0}) == TrialScheduler.CONTINUE
