"""Sweeps on a fake scheduler: identity and resumability, extension and refusal, the concurrency cap, the
budget, cancel and retry, MLflow parent and children, and a report whose numbers are scipy's."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats
from sqlalchemy import func, select

from orchestrator.db.models import Evaluation, Experiment, Sweep, SweepEvent, Trial
from orchestrator.errors import ConflictError
from orchestrator.jobs.records import get_job
from orchestrator.runs import resolve_config
from orchestrator.sweeps.search import validate_space
from orchestrator.sweeps.service import (
    cancel_sweep,
    create_sweep,
    plan_sweep,
    report_for,
    retry_failed,
    trial_request,
    trials_of,
)
from orchestrator.sweeps.spec import SweepSpec, load_spec, plan
from tests.harness import Harness
from tests.support import FASHION_MNIST, MICRO

SPEC: dict[str, Any] = {
    "name": "dino-vs-selfpatch",
    "base": {"preset": "tiny_cpu", "overrides": MICRO},
    "arms": {"list": [{"name": "dino", "overrides": ["method=dino"]}, {"name": "selfpatch"}]},
    "baseline": "dino",
    "seeds": 2,
    "evaluations": [{"benchmark": "knn", "data": str(FASHION_MNIST), "final": True}],
    "metrics": {"primary": "knn/top1_k20"},
    "launcher": "local",
    "resources": {"gpus_per_node": 1},
    "max_concurrent": 4,
}


def spec(**changes: Any) -> SweepSpec:
    return load_spec({**SPEC, **changes})


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.db.dispose()


def create(h: Harness, sweep_spec: SweepSpec, extend: bool = False) -> Any:
    with h.db.transaction() as session:
        made = create_sweep(session, h.settings, sweep_spec, "alice", extend=extend)
        return made.sweep.id, made.created, made.added


def trials(h: Harness, sweep_id: Any) -> list[Trial]:
    with h.db.sessions() as session:
        return trials_of(session, session.get(Sweep, sweep_id))


def finish(h: Harness, trial: Trial, value: float | None, outcome: str = "completed") -> None:
    """The trial's job trains (a numbered checkpoint in its folder, logged) and exits."""
    job_id = h.fake.job_of(trial.id)
    train = Path(trial.output_dir)
    train.mkdir(parents=True, exist_ok=True)
    checkpoint = train / "checkpoint0001.pth"
    checkpoint.write_bytes(f"weights {trial.id}".encode())
    import hashlib

    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    line = {"event": "checkpoint", "path": str(checkpoint), "epoch": 2, "iteration": 16, "sha256": sha}
    (train / "log.jsonl").write_text(json.dumps(line) + "\n")
    h.fake.finish(job_id, outcome, checkpoint=str(checkpoint), iteration=16, reason=None if value else "boom")


def test_a_sweep_is_arms_times_seeds_and_the_same_file_again_creates_nothing(h: Harness) -> None:
    sweep_id, created, added = create(h, spec())
    assert created and added == 4
    rows = trials(h, sweep_id)
    assert [(t.arm, t.seed, t.status) for t in rows] == [
        ("dino", 0, "queued"),
        ("dino", 1, "queued"),
        ("selfpatch", 0, "queued"),
        ("selfpatch", 1, "queued"),
    ]
    assert rows[0].config["method"] == "dino" and rows[2].config["method"] == "selfpatch"
    assert rows[1].config["seed"] == 1 and rows[0].config_hash != rows[1].config_hash
    again = create(h, spec())
    assert again == (sweep_id, False, 0)  # a crashed CLI or service runs `create` again: nothing new
    with h.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 4
        experiment = session.scalar(select(Experiment).where(Experiment.name == "sweeps/dino-vs-selfpatch"))
        assert experiment is not None and experiment.eval_policy["benchmarks"][0]["benchmark"] == "knn"


def test_twenty_concurrent_creates_of_one_file_make_one_sweep(h: Harness) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda _: create(h, spec()), range(20)))
    assert len({sweep_id for sweep_id, _, _ in results}) == 1
    assert sum(created for _, created, _ in results) == 1
    with h.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 4


def test_extending_is_explicit_and_a_changed_base_is_refused_with_a_diff(h: Harness) -> None:
    sweep_id, _, _ = create(h, spec())
    with pytest.raises(ConflictError, match="pass --extend"):
        create(h, spec(seeds=3))
    assert create(h, spec(seeds=3), extend=True) == (sweep_id, False, 2)  # only seed 2 of both arms
    changed = spec(base={"preset": "tiny_cpu", "overrides": [*MICRO, "optim.lr=0.001"]})
    with pytest.raises(ConflictError) as refused:
        create(h, changed, extend=True)
    assert "the base config changed" in refused.value.detail and "+ base.overrides" in refused.value.detail
    with h.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 6


def test_a_dry_run_plans_and_writes_nothing(h: Harness) -> None:
    with h.db.sessions() as session:
        planned = plan_sweep(session, h.settings, spec(), lambda s: "#SBATCH --job-name=x", extend=False)
        assert session.scalar(select(func.count()).select_from(Sweep)) == 0
    assert planned.exists == "no" and [(t.arm, t.seed) for t in planned.trials] == [
        ("dino", 0),
        ("dino", 1),
        ("selfpatch", 0),
        ("selfpatch", 1),
    ]
    assert len({t.config_hash for t in planned.trials}) == 4 and planned.estimate_accelerator_hours > 0
    assert "images x 2 epochs" in planned.assumption and planned.rendered.startswith("#SBATCH")


def test_trials_launch_within_max_concurrent(h: Harness) -> None:
    sweep_id, _, _ = create(h, spec(max_concurrent=1))
    h.tick()
    statuses = [t.status for t in trials(h, sweep_id)]
    assert statuses.count("submitted") == 1 and statuses.count("queued") == 3
    finish(h, next(t for t in trials(h, sweep_id) if t.status == "submitted"), 70.0)
    h.tick(2)
    assert [t.status for t in trials(h, sweep_id)].count("submitted") == 1


def test_a_sweep_past_its_budget_launches_nothing_more_and_says_so(h: Harness) -> None:
    from datetime import UTC, datetime, timedelta

    sweep_id, _, _ = create(h, spec(max_concurrent=1, budget={"accelerator_hours": 0.5}))
    h.tick()
    first = next(t for t in trials(h, sweep_id) if t.status == "submitted")
    h.fake.start(h.fake.job_of(first.id), started_at=datetime.now(UTC) - timedelta(hours=1))
    h.tick()
    finish(h, first, 70.0)
    h.tick(2)
    rows = trials(h, sweep_id)
    assert [t.status for t in rows].count("cancelled") == 3, [t.status for t in rows]
    assert all("sweep budget spent" in (t.status_reason or "") for t in rows if t.status == "cancelled")
    with h.db.sessions() as session:
        kinds = [e.kind for e in session.scalars(select(SweepEvent).where(SweepEvent.sweep_id == sweep_id))]
        assert "budget_spent" in kinds
        cost = report_for(session, session.get(Sweep, sweep_id)).accelerator_hours
    assert cost["total"] >= 1.0 and cost["dino"] >= 1.0


def test_cancel_stops_the_trials_and_retry_makes_new_ones_for_failed_pairs(h: Harness) -> None:
    sweep_id, _, _ = create(h, spec())
    h.tick()
    with h.db.transaction() as session:
        assert cancel_sweep(session, session.get(Sweep, sweep_id), "alice") == 4
    h.tick()
    assert len(h.fake.cancelled) == 4 and all(t.status == "cancelled" for t in trials(h, sweep_id))
    with h.db.transaction() as session:
        retried = retry_failed(session, h.settings, session.get(Sweep, sweep_id), "alice")
        assert len(retried) == 4 and all(r.kind == "trial" and r.retry_of_id for r in retried)
    latest = trials(h, sweep_id)
    assert [t.status for t in latest] == ["queued"] * 4 and {(t.arm, t.seed) for t in latest} == {
        ("dino", 0),
        ("dino", 1),
        ("selfpatch", 0),
        ("selfpatch", 1),
    }


def test_a_finished_sweep_reports_scipys_numbers_and_logs_them_to_its_mlflow_parent(h: Harness) -> None:
    sweep_id, _, _ = create(h, spec())
    h.tick()
    values = {("dino", 0): 60.0, ("dino", 1): 62.0, ("selfpatch", 0): 63.5, ("selfpatch", 1): 64.0}
    for trial in trials(h, sweep_id):
        finish(h, trial, values[(trial.arm, trial.seed)])
    h.tick()  # trials succeed, their final checkpoints get the policy's k-NN evaluation
    with h.db.sessions() as session:
        evaluations = {e.run_id: e for e in session.scalars(select(Evaluation))}
    assert len(evaluations) == 4
    h.tick()
    for trial in trials(h, sweep_id):
        job = h.fake.job_of(evaluations[trial.id].id)
        h.fake.finish(job, "completed", metrics={"knn/top1_k20": values[(trial.arm, trial.seed)]}, seconds=1.0)
    h.tick(2)
    with h.db.sessions() as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None and sweep.status == "completed"
        report = report_for(session, sweep)
    comparison = report.primary.comparisons[0]
    expected = scipy_stats.ttest_rel([63.5, 64.0], [60.0, 62.0])
    assert comparison.arm == "selfpatch" and comparison.mean_diff == pytest.approx(2.75)
    assert comparison.p == pytest.approx(expected.pvalue) and comparison.t == pytest.approx(expected.statistic)
    assert not report.partial and "fewer than 3" in " ".join(report.primary.warnings)
    parent = sweep.mlflow_run_id
    assert parent is not None and h.mlflow.runs[parent] == "FINISHED"
    assert {"sweep_report.md", "sweep_report.json", "sweep_report.csv", "plots/metric.png"} <= set(
        h.mlflow.artifacts[parent]
    )
    children = [tags for run, tags in h.mlflow.tags.items() if tags.get("mlflow.parentRunId") == parent]
    assert sorted((c["orch.arm"], c["orch.seed"]) for c in children) == [
        ("dino", "0"),
        ("dino", "1"),
        ("selfpatch", "0"),
        ("selfpatch", "1"),
    ] and all(c["orch.sweep_id"] == str(sweep_id) for c in children)


def test_sweep_files_are_validated_like_run_configs() -> None:
    from trainer.presets import ConfigError

    for bad, field in (
        ({**SPEC, "baseline": "nope"}, "baseline"),
        ({**SPEC, "arms": {"grid": {"selfpatch.k": [1, 2]}, "list": []}}, "arms"),
        ({**SPEC, "arms": {"zip": {"selfpatch.k": [1, 2], "seed": [1]}}}, "arms"),
        ({**SPEC, "seeds": [1, 1]}, "seeds"),
        ({**SPEC, "base": {"preset": "/etc/passwd"}}, "base.preset"),
        ({**SPEC, "max_concurrent": 0}, "max_concurrent"),
    ):
        with pytest.raises(ConfigError) as refused:
            load_spec(bad)
        assert (refused.value.field or "").startswith(field.split(".")[0]), (field, refused.value)
    grid = load_spec({**SPEC, "arms": {"grid": {"selfpatch.k": [1, 2, 4, 8]}}, "baseline": "k=4"})
    assert [a.name for a in grid.arms.expand()] == ["k=1", "k=2", "k=4", "k=8"] and grid.baseline_arm == "k=4"


def test_every_sweep_preset_loads_and_expands() -> None:
    from trainer.presets import preset_dir

    presets = sorted((preset_dir() / "sweeps").glob("*.yaml"))
    assert len(presets) >= 16  # the paper's ablations and a search, at full and at tiny scale
    for path in presets:
        loaded = load_spec(path.stem)
        if loaded.search is not None:
            validate_space(loaded)  # every dimension's edge values make a valid config
            continue
        assert len(loaded.arms.expand()) >= 2 and loaded.baseline_arm in [a.name for a in loaded.arms.expand()]
        hashes = {resolve_config(trial_request(loaded, trial)).config_hash() for trial in plan(loaded)}
        assert len(hashes) == len(plan(loaded))  # every trial is a valid, distinct experiment


def test_a_trials_run_keeps_its_kind_when_retried(h: Harness) -> None:
    sweep_id, _, _ = create(h, spec())
    with h.db.sessions() as session:
        first = get_job(session, Trial, trials(h, sweep_id)[0].id, "trial")
        assert first.kind == "trial" and first.sweep_id == sweep_id


def test_trials_on_slurm_go_out_as_one_array_each_task_its_own_job(h: Harness) -> None:
    sweep_id, _, _ = create(h, spec(launcher="slurm", max_concurrent=4))
    h.tick()
    assert len(h.fake.arrays) == 1
    ids, parallelism = h.fake.arrays[0]
    rows = trials(h, sweep_id)
    assert parallelism == 4 and sorted(ids) == sorted(h.fake.job_of(t.id) for t in rows)  # the cap is the array's %
    assert all(t.status == "submitted" for t in rows)
    h.tick()
    assert len(h.fake.arrays) == 1  # submitted once
    # each task is its own job: one is preempted and comes back alone as attempt 2
    first = rows[0]
    h.fake.start(h.fake.job_of(first.id))
    h.tick()
    h.fake.finish(h.fake.job_of(first.id), "interrupted", iteration=4)
    h.tick(2)
    with h.db.sessions() as session:
        again = get_job(session, Trial, first.id, "trial")
        assert [a.number for a in again.attempts] == [1, 2]
    assert len(h.fake.arrays) == 1  # the requeue is a single submission, not a new array
    others = [t for t in trials(h, sweep_id) if t.id != first.id]
    with h.db.sessions() as session:
        assert all(len(get_job(session, Trial, t.id, "trial").attempts) == 1 for t in others)


def test_past_the_budget_trials_waiting_in_an_array_are_cancelled(h: Harness) -> None:
    from datetime import UTC, datetime, timedelta

    sweep_id, _, _ = create(h, spec(launcher="slurm", max_concurrent=1, budget={"accelerator_hours": 0.5}))
    h.tick()
    rows = trials(h, sweep_id)
    assert len(h.fake.arrays) == 1 and h.fake.arrays[0][1] == 1  # all four submitted, one at a time
    h.fake.start(h.fake.job_of(rows[0].id), started_at=datetime.now(UTC) - timedelta(hours=1))
    h.tick()  # it runs (for an hour already): the budget is spent
    statuses = [t.status for t in trials(h, sweep_id)]
    assert statuses == ["running", "cancelled", "cancelled", "cancelled"], statuses
    h.tick()  # the reconciler stops the scheduler jobs of cancelled trials
    assert {h.fake.job_of(t.id) for t in rows[1:]} <= set(h.fake.cancelled)  # scancel of the pending tasks
