"""`orchestrator study`: a 2x2 mini version of the paper-core study (DINO vs SelfPatch, 2 seeds) pretrained
on composites, probed patch by patch, run end to end through the embedded service, and its evidence folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api.shell.study import Floor, floors_markdown, reported_metrics, summary_markdown
from evaluator.composites import study
from tests.eval_support import COMPOSITE_SOURCES
from tests.support import MICRO, REPO, free_port

#: Probe configs small enough for seconds: 4 train and 3 val images at the tiny 64-px geometry.
PROBE = ["max_train_images=4", "max_val_images=3", "pixel_patch_size=4"]


def test_floors_table_has_one_row_per_metric_and_says_when_a_floor_failed() -> None:
    floors = [
        Floor("dense_linear/mIoU", "random", 12.0),
        Floor("dense_linear/mIoU", "pixels", 11.5),
        Floor("knn_seg/fg_mIoU", "random", None, "error: boom"),
    ]
    table = floors_markdown(floors)
    assert "| dense_linear/mIoU | 12.00 | 11.50 |" in table
    assert "| knn_seg/fg_mIoU | failed: error: boom | - |" in table
    assert floors_markdown([]) == ""


def test_reported_metrics_are_the_primary_then_the_secondary_ones() -> None:
    spec = {"metrics": {"primary": "a/x", "secondary": ["b/y", "c/z"]}}
    assert reported_metrics(spec) == ["a/x", "b/y", "c/z"]


def _metric(name: str, p: float | None) -> dict[str, object]:
    arms = [
        {"arm": "dino", "n": 3, "mean": 10.0, "ci_low": 9.0, "ci_high": 11.0},
        {"arm": "selfpatch", "n": 3, "mean": 12.0, "ci_low": 11.0, "ci_high": 13.0},
    ]
    comparison = {"arm": "selfpatch", "mean_diff": 2.0, "ci_low": 1.0, "ci_high": 3.0, "p": p}
    return {"metric": name, "arms": arms, "comparisons": [comparison]}


def test_the_summary_adjusts_p_across_every_metric_and_shows_the_floors() -> None:
    report = {"primary": _metric("a/mIoU", 0.01), "secondary": [_metric("b/mIoU", 0.04), _metric("c/x", None)]}
    table = summary_markdown(report, [Floor("a/mIoU", "random", 8.0), Floor("a/mIoU", "pixels", 7.5)])
    # the family is the 3 planned comparisons (c/x without a p counts as p = 1): 0.01 x 3, then 0.04 x 2
    assert "| a/mIoU | dino | 3 | 10.00 [9.00, 11.00] | baseline |  |  | 8.00 | 7.50 |" in table
    assert (
        "| a/mIoU | selfpatch | 3 | 12.00 [11.00, 13.00] | 2.00 [1.00, 3.00] | 0.010 | 0.030 | 8.00 | 7.50 |" in table
    )
    assert "| b/mIoU | selfpatch | 3 | 12.00 [11.00, 13.00] | 2.00 [1.00, 3.00] | 0.040 | 0.080 | - | - |" in table
    assert "| c/x | selfpatch | 3 | 12.00 [11.00, 13.00] | 2.00 [1.00, 3.00] | - | - | - | - |" in table


@pytest.mark.slow
def test_a_2x2_mini_study_runs_end_to_end_and_writes_its_evidence(tmp_path: Path) -> None:
    data = tmp_path / "composites"
    study(COMPOSITE_SOURCES, data, pretrain=16, train=4, val=3, size=64, seed=0)
    overrides = [o for o in MICRO if not o.startswith(("data.", "method="))]
    spec = {
        "name": "mini-study",
        "base": {
            "preset": "scenes_cpu",
            "overrides": [*overrides, f"data.path={data / 'pretrain'}", "data.num_workers=0"],
        },
        "arms": {"list": [{"name": "dino", "overrides": ["method=dino"]}, {"name": "selfpatch"}]},
        "baseline": "dino",
        "seeds": 2,
        "evaluations": [
            {"benchmark": "dense_linear", "data": str(data), "overrides": [*PROBE, "iterations=5"]},
            {"benchmark": "knn_seg", "data": str(data), "overrides": [*PROBE, "labels=foreground"]},
        ],
        "metrics": {"primary": "dense_linear/mIoU", "secondary": ["knn_seg/fg_mIoU"]},
        "launcher": "local",
        "max_concurrent": 1,
    }
    sweep_file = tmp_path / "mini_study.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "results"
    command = [sys.executable, "-m", "api.shell.cli", "study", str(sweep_file), "--out", str(out)]
    command += ["--home", str(tmp_path / "home"), "--port", str(free_port())]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert (out / "sweep.yaml").read_text() == sweep_file.read_text()  # the exact file, not a re-dump
    report = json.loads((out / "report.json").read_text())
    metrics = [report["primary"], *report["secondary"]]
    assert [m["metric"] for m in metrics] == ["dense_linear/mIoU", "knn_seg/fg_mIoU"]
    for metric in metrics:
        assert {a["arm"]: a["n"] for a in metric["arms"]} == {"dino": 2, "selfpatch": 2}  # both seeds measured
        (comparison,) = metric["comparisons"]
        assert comparison["arm"] == "selfpatch" and comparison["pairs"] == 2
        assert comparison["p_holm"] is None or 0.0 <= comparison["p_holm"] <= 1.0
    record = json.loads((out / "study.json").read_text())
    assert record["wall_s"] > 0 and record["sweep_wall_s"] > 0 and record["sweep_id"] == report["sweep_id"]
    assert len(record["commit"]) == 40 or record["commit"] == "unknown"
    floors = {(f["metric"], f["baseline"]) for f in record["floors"] if f["value"] is not None}
    assert floors == {(m, b) for m in ("dense_linear/mIoU", "knn_seg/fg_mIoU") for b in ("random", "pixels")}
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Study: mini-study") and "## Summary" in markdown and "## Floors" in markdown
    assert "| dense_linear/mIoU | selfpatch | 2 |" in markdown
    assert (out / "plots" / "metric.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "plots" / "differences.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
