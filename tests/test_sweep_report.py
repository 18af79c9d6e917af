"""Sweep reports in every format, and the figures, from constructed trials with known numbers."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace
from typing import Literal

import pytest
from rich.console import Console
from scipy import stats

from orchestrator.sweeps.plots import curves_plot, differences_plot, metric_plot
from orchestrator.sweeps.report import CSV_COLUMNS, SweepReport, TrialRow, build_report, dumps
from orchestrator.sweeps.stats import Observation, analyse

KNN = "knn/top1_k20"
#: seed -> (knn, loss): selfpatch beats dino on every seed; "wide" differs from dino by noise only.
VALUES = {
    "dino": {0: (60.1, 2.0), 1: (61.0, 2.1), 2: (59.8, 1.9)},
    "selfpatch": {0: (61.5, 1.8), 1: (62.1, 1.9), 2: (61.0, 1.7)},
    "wide": {0: (60.4, 2.0), 1: (60.7, 2.3), 2: (60.1, 1.8)},
}
ARMS = ["dino", "selfpatch", "wide"]


def trial(arm: str, seed: int, status: str = "succeeded", hours: float = 1.0) -> TrialRow:
    metrics = dict(zip((KNN, "loss"), VALUES[arm][seed], strict=True)) if status == "succeeded" else {}
    return TrialRow(arm, seed, status, f"run-{arm}-{seed}", metrics, hours * 3600.0)


def all_trials() -> list[TrialRow]:
    return [trial(arm, seed) for arm in ARMS for seed in range(3)]


def make(trials: list[TrialRow], budget_hours: float | None = None) -> SweepReport:
    return build_report(
        "ablation", "sw-1", trials, ARMS, "dino", KNN, "max", ["loss"], budget_hours, directions={"loss": "min"}
    )


def test_numbers_come_from_succeeded_trials_only() -> None:
    trials = all_trials()
    trials[2] = TrialRow("dino", 2, "failed", "run-x", {KNN: 10.0, "loss": 9.0}, 1800.0)
    report = make(trials)
    dino = report.primary.arms[0]
    assert dino.values == {0: 60.1, 1: 61.0} and dino.n == 2
    assert any("failed: seeds [2]" in w and "not in the numbers" in w for w in report.primary.warnings)
    selfpatch = report.primary.comparisons[0]
    assert selfpatch.pairs == 2 and selfpatch.missing == [2]
    assert selfpatch.t == pytest.approx(stats.ttest_rel([61.5, 62.1], [60.1, 61.0]).statistic)


def test_partial_until_every_trial_is_terminal() -> None:
    trials = all_trials()
    assert make(trials).partial is False
    trials[-1] = trial("wide", 2, "failed")
    trials[-2] = trial("wide", 1, "cancelled")
    assert make(trials).partial is False
    for status in ("queued", "submitted", "running", "preempted", "requeued"):
        trials[0] = trial("dino", 0, status)
        report = make(trials)
        assert report.partial is True
        assert "PARTIAL" in report.to_markdown() and report.to_json()["partial"] is True
        assert all(row["partial"] == "true" for row in csv.DictReader(io.StringIO(report.to_csv())))
    assert "PARTIAL" not in make(all_trials()).to_markdown()


def test_accelerator_hours_per_arm_and_total() -> None:
    trials = [*all_trials(), trial("selfpatch", 3, "failed", hours=0.5), TrialRow("extra", 0, "failed", "r", {}, 900)]
    report = make(trials, budget_hours=20.0)
    assert report.accelerator_hours == pytest.approx(
        {"dino": 3.0, "selfpatch": 3.5, "wide": 3.0, "extra": 0.25, "total": 9.75}
    )
    assert list(report.accelerator_hours) == ["dino", "selfpatch", "wide", "extra", "total"]
    assert report.to_json()["budget_used"] == pytest.approx(9.75 / 20.0)
    markdown = report.to_markdown()
    assert "| total | **9.75** |" in markdown and "| budget | 20 (49% used) |" in markdown


def test_json_round_trips() -> None:
    trials = all_trials()
    trials[0] = TrialRow("dino", 0, "succeeded", "run-dino-0", {KNN: 60.1, "loss": math.nan}, math.inf)
    payload = make(trials).to_json()
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert json.loads(dumps(make(trials))) == payload
    assert list(payload) == [
        "sweep",
        "sweep_id",
        "partial",
        "confidence",
        "status_counts",
        "primary",
        "secondary",
        "accelerator_hours",
        "budget_hours",
        "budget_used",
        "trials",
    ]
    assert payload["budget_hours"] is None and payload["trials"][0]["metrics"]["loss"] is None
    primary = payload["primary"]
    assert primary["arms"][0]["values"] == {"0": 60.1, "1": 61.0, "2": 59.8}
    comparison = primary["comparisons"][0]
    assert list(comparison)[:3] == ["arm", "baseline", "pairs"] and comparison["verdict"] == "better"
    assert payload["secondary"][0]["metric"] == "loss" and payload["secondary"][0]["direction"] == "min"


def test_markdown_tables_and_verdicts() -> None:
    report = make(all_trials())
    markdown = report.to_markdown()
    assert "| arm | n | mean | std | CI low | CI high |" in markdown
    assert "| arm | pairs | mean diff | t CI | bootstrap CI | t | p | Holm p | d_z | verdict |" in markdown
    assert "| dino (baseline) | 3 | 60.3 |" in markdown
    # the first row of each arm with a signed difference is the primary metric's comparison
    lines: dict[str, str] = {}
    for line in markdown.splitlines():
        cells = line.split(" | ")
        if len(cells) > 3 and cells[2][:1] in "+-":
            lines.setdefault(cells[0].strip("| "), line)
    selfpatch, wide = report.primary.comparisons
    assert selfpatch.significant and selfpatch.p_holm is not None and selfpatch.p_holm < 0.05
    assert wide.p_holm is not None and wide.p_holm >= 0.05
    assert lines["selfpatch"].endswith("| **better** |")
    assert lines["wide"].endswith("| not significant |")
    assert "## Secondary metric: `loss`" in markdown and "Lower is better" in markdown
    assert "### Values per seed" in markdown and "| seed 0 | seed 1 | seed 2 |" in markdown


def test_markdown_shows_why_a_seed_has_no_value() -> None:
    trials = all_trials()
    trials[5] = trial("selfpatch", 2, "running")
    trials[8] = TrialRow("wide", 2, "succeeded", "r", {"loss": 1.0}, 3600.0)
    markdown = make(trials).to_markdown()
    assert "| selfpatch | 61.5 | 62.1 | running |" in markdown
    assert "| wide | 60.4 | 60.7 | no value |" in markdown
    assert "succeeded without a value of 'knn/top1_k20'" in markdown


def test_csv_has_one_row_per_metric_and_arm() -> None:
    report = make(all_trials())
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [(r["metric"], r["arm"]) for r in rows] == [(m, a) for m in (KNN, "loss") for a in ARMS]
    assert tuple(rows[0]) == CSV_COLUMNS
    base, selfpatch = rows[0], rows[1]
    assert base["is_baseline"] == "true" and base["p"] == "" and base["verdict"] == ""
    assert float(base["mean"]) == pytest.approx(60.3) and base["values"] == "0:60.1;1:61.0;2:59.8"
    comparison = report.primary.comparisons[0]
    assert float(selfpatch["p_holm"]) == comparison.p_holm and float(selfpatch["t"]) == comparison.t
    assert selfpatch["verdict"] == "better" and selfpatch["significant"] == "true"
    loss = rows[4]
    assert loss["direction"] == "min" and loss["better"] == "true" and loss["role"] == "secondary"


def test_secondary_direction_defaults_to_the_primary_with_a_warning() -> None:
    report = build_report("a", "b", all_trials(), ARMS, "dino", KNN, "max", secondary=["loss", KNN])
    assert [m.metric for m in report.secondary] == ["loss"]
    assert report.secondary[0].direction == "max"
    assert any("no direction given" in w for w in report.secondary[0].warnings)


def test_rich_marks_partial_and_dims_non_significant_rows() -> None:
    trials = all_trials()
    trials[0] = trial("dino", 0, "running")
    group = make(trials).to_rich()
    console = Console(record=True, width=200)
    console.print(group)
    text = console.export_text()
    assert "PARTIAL" in text and "not significant" in text and "Accelerator hours" in text
    table = next(r for r in group.renderables if hasattr(r, "rows"))
    assert [row.style for row in table.rows] == ["bold", "dim", "dim"]  # with 2 pairs nothing is significant
    complete = make(all_trials()).to_rich()
    table = next(r for r in complete.renderables if hasattr(r, "rows"))
    assert [row.style for row in table.rows] == ["bold", "green", "dim"]


def test_empty_sweep_reports_without_error() -> None:
    report = make([TrialRow(arm, 0, "queued", "", {}, 0.0) for arm in ARMS])
    assert report.partial and report.primary.arms[0].n == 0
    assert json.loads(json.dumps(report.to_json())) == report.to_json()
    assert "undetermined" in report.to_markdown()
    assert len(list(csv.DictReader(io.StringIO(report.to_csv())))) == 6
    Console(record=True).print(report.to_rich())


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_plots_render(fmt: Literal["png", "svg"]) -> None:
    data = [Observation(arm, seed, knn) for arm in ARMS for seed, (knn, _) in VALUES[arm].items()]
    report = analyse(KNN, data, [*ARMS, "empty"], "dino")
    empty = analyse(KNN, [], ["dino", "other"], "dino")
    curves = {
        "dino": {0: [(0, 1.0), (10, 0.5), (20, 0.3)], 1: [(0, 1.1), (10, 0.6), (20, 0.35), (30, 0.3)]},
        "selfpatch": {0: [(0, 0.9), (10, math.nan), (20, 0.2)], 1: []},
    }
    figures = [
        metric_plot(report, fmt),
        metric_plot(report, fmt, knob={"dino": 0.0, "selfpatch": 1.0, "wide": 2.0}),
        differences_plot(report, fmt),
        curves_plot(curves, "loss", fmt),
        metric_plot(empty, fmt),
        differences_plot(empty, fmt),
        curves_plot({}, "loss", fmt),
    ]
    for figure in figures:
        assert len(figure) > 1000
        if fmt == "png":
            assert figure.startswith(b"\x89PNG")
        else:
            assert b"<svg" in figure
    if fmt == "png":
        assert metric_plot(report, fmt) == figures[0]  # the same report gives the same file


def test_plots_reject_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        metric_plot(analyse(KNN, [], ["dino"], "dino"), "jpg")  # type: ignore[arg-type]


def test_plot_labels_say_which_correction_their_p_values_carry() -> None:
    """A difference plot's Holm runs over one metric's arms: with a single arm it corrects nothing, and the
    figure says 'uncorrected' rather than print a 'Holm p' a reader would take for the study-wide one."""
    data = [Observation(arm, seed, knn) for arm in ARMS for seed, (knn, _) in VALUES[arm].items()]
    two = analyse(KNN, [o for o in data if o.arm in ("dino", "selfpatch")], ["dino", "selfpatch"], "dino")
    many = analyse(KNN, data, list(ARMS), "dino")
    assert len(two.comparisons) == 1 and len(many.comparisons) > 1
    single = differences_plot(two, "svg").decode()
    several = differences_plot(many, "svg").decode()
    assert "uncorrected" in single and "Holm p =" not in single
    assert "Holm p =" in several and "uncorrected" not in several
    for figure in (single, several):
        assert "Holm across this metric's arms only, not across metrics" in figure
    title = metric_plot(two, "svg").decode()  # two lines, so it fits the narrow figure of two arms
    assert f"<!-- {KNN} (higher is better) -->" in title and "<!-- mean ± 95% t CI, dots are seeds -->" in title


def test_collapsed_trials_are_named_in_the_report_and_still_counted() -> None:
    trials = all_trials()
    reason = "collapsed (uniform teacher on the patch head at step 410: H(P_t) = 0.977 ln K)"
    trials[0] = replace(trials[0], collapsed=reason)
    report = make(trials)
    text = report.to_markdown()
    assert "> **Collapsed**" in text and f"> - {trials[0].arm} seed {trials[0].seed}: {reason}" in text
    assert report.to_json()["trials"][0]["collapsed"] == reason
    assert report.primary.arms[0].n == make(all_trials()).primary.arms[0].n  # its value still counts
    assert "Collapsed" not in make(all_trials()).to_markdown()
