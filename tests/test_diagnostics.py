"""DINO's collapse diagnostics: the numbers on constructed logits with known answers, the detector's rules,
a real run that logs them and stops when told to, and the service's record of a collapsed run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import micro_overrides
from trainer.diagnostics import CollapseDetector, head_diagnostics
from trainer.presets import load_config
from trainer.train import train

K, B = 64, 32


def diag(
    teacher: torch.Tensor, student: torch.Tensor | None = None, features: torch.Tensor | None = None
) -> dict[str, float]:
    return head_diagnostics(teacher, teacher if student is None else student, torch.zeros(1, K), 0.04, 0.1, features)


def test_a_uniform_teacher_has_entropy_ln_k_and_a_one_hot_one_has_zero() -> None:
    uniform = diag(torch.zeros(B, K))
    assert uniform["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert uniform["batch_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    same = torch.zeros(B, K)
    same[:, 3] = 100.0  # every image on output 3: the one-hot collapse
    onehot = diag(same)
    assert onehot["teacher_entropy"] == pytest.approx(0.0, abs=1e-4) and onehot["batch_entropy"] == pytest.approx(
        0.0, abs=1e-4
    )
    healthy = torch.zeros(B, K)
    healthy[torch.arange(B), torch.arange(B)] = 100.0  # sharp and spread: each image its own output
    spread = diag(healthy)
    assert spread["teacher_entropy"] == pytest.approx(0.0, abs=1e-4)
    assert spread["batch_entropy"] == pytest.approx(math.log(B), rel=1e-4)


def test_kl_is_zero_for_equal_distributions_and_matches_a_hand_computation() -> None:
    logits = torch.randn(B, K)
    assert diag(logits * 0.04, logits * 0.1)["kl"] == pytest.approx(0.0, abs=1e-5)  # same softmax after temperatures
    teacher, student = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)  # p = (1/4, 3/4), q = (1/2, 1/2)
    values = head_diagnostics(teacher * 0.04, student, torch.zeros(1, 2), 0.04, 0.1)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert values["kl"] == pytest.approx(expected, rel=1e-5)


def test_feature_std_is_zero_for_one_point_and_about_one_over_sqrt_d_for_a_spread() -> None:
    d = 256
    assert diag(torch.zeros(B, K), features=torch.ones(B, d))["feature_std"] == pytest.approx(0.0, abs=1e-6)
    spread = diag(torch.zeros(4096, K), features=torch.randn(4096, d, generator=torch.Generator().manual_seed(0)))
    assert spread["feature_std"] == pytest.approx(1 / math.sqrt(d), rel=0.05)


def test_the_detector_waits_for_the_start_and_for_consecutive_windows() -> None:
    detector = CollapseDetector({"cls": K}, uniform_ratio=0.97, onehot_ratio=0.05, start=100, windows=3)
    uniform = {"diag/cls_teacher_entropy": math.log(K) * 0.99, "diag/cls_batch_entropy": math.log(K)}
    healthy = {"diag/cls_teacher_entropy": math.log(K) * 0.5, "diag/cls_batch_entropy": math.log(K) * 0.9}
    assert detector.update(50, uniform) is None  # before the start: a random teacher is near-uniform
    assert detector.update(100, uniform) is None and detector.update(110, uniform) is None
    assert detector.update(120, healthy) is None  # the run is broken: counting starts again
    assert [detector.update(step, uniform) for step in (130, 140)] == [None, None]
    found = detector.update(150, uniform)
    assert found is not None and (found.head, found.mode, found.iteration) == ("cls", "uniform", 150)
    assert "uniform teacher on the cls head at step 150" in found.reason()
    assert detector.update(160, uniform) is None  # reported once
    onehot = CollapseDetector({"patch": K}, 0.97, 0.05, start=0, windows=1)
    found = onehot.update(1, {"diag/patch_teacher_entropy": 0.0, "diag/patch_batch_entropy": 0.01})
    assert found is not None and found.mode == "one-hot"


def _log(output: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_a_run_logs_the_diagnostics_of_both_heads_and_stops_when_collapse_stop_is_set(tmp_path: Path) -> None:
    flagged = tmp_path / "flagged"
    # thresholds no teacher can meet the healthy side of: the run is "collapsed" as soon as checking starts
    forced = ["collapse.uniform_ratio=0.0001", "collapse.after=0", "collapse.windows=2"]
    result = train(load_config("tiny_cpu", micro_overrides(flagged, "selfpatch", *forced)))
    assert result.status == "completed"  # flagged, not stopped: collapse.stop is off by default
    steps = [r for r in _log(flagged) if r["event"] == "step"]
    for name in ("teacher_entropy", "kl", "batch_entropy", "center_norm", "feature_std"):
        assert all(f"diag/cls_{name}" in r and f"diag/patch_{name}" in r for r in steps), name
    assert all(0 <= float(r["diag/cls_teacher_entropy_ratio"]) <= 1.0 + 1e-6 for r in steps)  # type: ignore[arg-type]
    events = [r for r in _log(flagged) if r["event"] == "collapse"]
    assert len(events) == 1 and events[0]["iteration"] == 4 and events[0]["stop"] is False  # 2 log windows of 2 steps

    stopped = tmp_path / "stopped"
    result = train(load_config("tiny_cpu", micro_overrides(stopped, "dino", *forced, "collapse.stop=true")))
    assert (
        result.status == "collapsed" and result.iteration == 4 and "collapsed (uniform teacher" in (result.reason or "")
    )
    assert (stopped / "checkpoint.pth").exists() and not (stopped / "export").exists()
    assert not any("diag/patch_kl" in r for r in _log(stopped))  # DINO has no patch head


def test_the_service_records_a_collapse_the_trainer_logged(tmp_path: Path) -> None:
    from tests.harness import Harness

    h = Harness(tmp_path)
    run_id = h.submit()
    h.tick()
    h.fake.start(h.scheduler_id(run_id))
    run = h.job(run_id)
    output = Path(run.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    line = {"event": "collapse", "iteration": 40, "head": "cls", "mode": "uniform", "ratio": 0.99}
    line |= {"reason": "collapsed (uniform teacher on the cls head at step 40: H(P_t) = 0.990 ln K)", "stop": False}
    (output / "log.jsonl").write_text(json.dumps(line) + "\n")
    h.tick()
    run = h.job(run_id)
    assert run.progress["collapsed"]["mode"] == "uniform" and run.progress["collapsed"]["iteration"] == 40
    from api.routes.runs import run_public

    assert "uniform teacher on the cls head" in (run_public(run, h.mlflow).collapsed or "")  # type: ignore[arg-type]
    from sqlalchemy import select

    from orchestrator.db.models import Event

    with h.db.sessions() as session:
        kinds = [e.kind for e in session.scalars(select(Event).where(Event.job_id == run_id))]
    assert kinds.count("collapsed") == 1
    h.tick()  # recorded once
    with h.db.sessions() as session:
        assert [e.kind for e in session.scalars(select(Event).where(Event.job_id == run_id))].count("collapsed") == 1
    h.db.dispose()


def test_a_job_stopped_for_collapse_fails_with_the_reason(tmp_path: Path) -> None:
    from orchestrator.jobs.files import EXIT_FAILED, JobFile, read_result
    from orchestrator.jobs.train import run
    from tests.launcher_support import make_run_dir

    forced = ("collapse.uniform_ratio=0.0001", "collapse.after=0", "collapse.windows=1", "collapse.stop=true")
    folder = make_run_dir(tmp_path / "run", "http://127.0.0.1:9", "local", 2, *forced)
    assert run(JobFile.read(folder), folder, 1) == EXIT_FAILED
    result = read_result(folder, 1)
    assert result is not None and result.status == "failed" and "collapsed (uniform teacher" in (result.reason or "")


@pytest.mark.slow
def test_the_tiny_preset_trains_clear_of_both_collapse_modes(tmp_path: Path) -> None:
    """The whole tiny_cpu preset (what `make demo` runs): after the detector's warm-up, every logged teacher
    of both heads stays below the uniform threshold and its batch mean above the one-hot threshold."""
    cfg = load_config("tiny_cpu", [f"checkpoint.output_dir={tmp_path}", "logging.mlflow=false", "logging.progress=off"])
    result = train(cfg)
    assert result.status == "completed", result.reason
    log = _log(tmp_path)
    assert not [r for r in log if r["event"] == "collapse"]
    start = cfg.collapse.after * result.iteration
    checked = [r for r in log if r["event"] == "step" and int(r["iteration"]) >= start]  # type: ignore[call-overload]
    assert len(checked) >= 10
    for head in ("cls", "patch"):
        uniform = max(float(r[f"diag/{head}_teacher_entropy_ratio"]) for r in checked)  # type: ignore[arg-type]
        onehot = min(float(r[f"diag/{head}_batch_entropy_ratio"]) for r in checked)  # type: ignore[arg-type]
        assert uniform < cfg.collapse.uniform_ratio and onehot > cfg.collapse.onehot_ratio, (head, uniform, onehot)
