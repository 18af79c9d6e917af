"""`orchestrator study-pool`: studies of one ablation with disjoint seeds analysed as one sweep, and refused
(with a one-line reason, nothing written) when they are not parts of one ablation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from scipy import stats

from api.shell.study import Floor
from api.shell.study_pool import pool_studies
from orchestrator.sweeps.report import TrialRow, build_report
from orchestrator.sweeps.spec import SweepSpec, pooled
from tests.support import REPO

#: Per seed: (dino, selfpatch) values of the primary metric; seeds 0-2 in part 1, 3-4 in part 2.
VALUES = {0: (10.0, 11.0), 1: (12.0, 12.5), 2: (11.0, 13.0), 3: (9.5, 10.0), 4: (10.5, 12.5)}


def _spec(name: str, seeds: list[int], **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "base": {"preset": "scenes_cpu", "overrides": ["optim.epochs=16"]},
        "arms": {"list": [{"name": "dino", "overrides": ["method=dino"]}, {"name": "selfpatch"}]},
        "baseline": "dino",
        "seeds": seeds,
        "evaluations": [{"benchmark": "dense_linear", "data": "data/composites-study"}],
        "metrics": {"primary": "dense_linear/mIoU", "secondary": ["dense_linear/fg_mIoU"]},
    }
    spec.update(changes)
    return spec


def _study(folder: Path, spec: dict[str, Any], floors: list[Floor], commit: str = "unknown") -> Path:
    """An evidence folder as `orchestrator study` writes it, with the VALUES of the spec's seeds."""
    trials = [
        TrialRow(
            arm, seed, "succeeded", f"{arm}-{seed}", {"dense_linear/mIoU": value, "dense_linear/fg_mIoU": 50.0}, 0.0
        )
        for seed in spec["seeds"]
        for arm, value in zip(("dino", "selfpatch"), VALUES[seed], strict=True)
    ]
    report = build_report(
        spec["name"], f"id-{spec['name']}", trials, ["dino", "selfpatch"], "dino", "dense_linear/mIoU", "max"
    )
    folder.mkdir(parents=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec))
    (folder / "report.json").write_text(json.dumps(report.to_json()))
    record = {"sweep_id": f"id-{spec['name']}", "name": spec["name"], "spec_hash": "h", "commit": commit}
    record |= {"dirty": False, "sweep_wall_s": 600.0, "floors": [f.__dict__ for f in floors]}
    (folder / "study.json").write_text(json.dumps(record))
    return folder


def test_pooled_spec_has_every_seed_and_refuses_anything_but_disjoint_seeds() -> None:
    first = SweepSpec.model_validate(_spec("a", [0, 1, 2]))
    second = SweepSpec.model_validate(_spec("b", [4, 3]))
    assert pooled([first, second]).seed_list == [0, 1, 2, 3, 4]

    overlapping = SweepSpec.model_validate(_spec("c", [2, 3]))
    with pytest.raises(ValueError, match="c repeats seed 2 of a"):
        pooled([first, overlapping])
    longer = SweepSpec.model_validate(_spec("d", [5], base={"preset": "scenes_cpu", "overrides": []}))
    with pytest.raises(ValueError, match=r"d and a differ in more than their seeds: - base\.overrides"):
        pooled([first, longer])
    with pytest.raises(ValueError, match="at least two"):
        pooled([first])


def test_pooling_analyses_every_seed_pair_as_one_sweep(tmp_path: Path) -> None:
    floors = [Floor("dense_linear/mIoU", "random", 9.0), Floor("dense_linear/mIoU", "pixels", 8.0)]
    part1 = _study(tmp_path / "part1", _spec("core", [0, 1, 2]), floors)
    part2 = _study(
        tmp_path / "part2", _spec("core-more", [3, 4]), [*floors[:1], Floor("dense_linear/mIoU", "pixels", 8.5)]
    )
    out = tmp_path / "pooled"

    record = pool_studies([part1, part2], out, "core-5")

    report = json.loads((out / "report.json").read_text())
    dino, selfpatch = report["primary"]["arms"]
    assert dino["n"] == selfpatch["n"] == 5
    assert selfpatch["mean"] == pytest.approx(sum(v[1] for v in VALUES.values()) / 5)
    (comparison,) = report["primary"]["comparisons"]
    expected = stats.ttest_rel([v[1] for v in VALUES.values()], [v[0] for v in VALUES.values()])
    assert comparison["pairs"] == 5 and comparison["p"] == pytest.approx(expected.pvalue)
    assert record.seeds == [0, 1, 2, 3, 4] and [s.seeds for s in record.sources] == [[0, 1, 2], [3, 4]]
    assert record.floor_disagreements == ["dense_linear/mIoU pixels: part 1 8.0000, part 2 8.5000"]
    assert record.code_changes is None  # commits git cannot find are said to be unknown, not "identical"
    pooled_spec = SweepSpec.model_validate(yaml.safe_load((out / "sweep.yaml").read_text()))
    assert pooled_spec.name == "core-5" and pooled_spec.seed_list == [0, 1, 2, 3, 4]
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Pooled study: core-5") and "| 2 | `core-more` | 3, 4 |" in markdown
    assert "| dense_linear/mIoU | selfpatch | 5 |" in markdown and "Floors differ between the parts" in markdown
    assert "reported before sweep reports named collapsed trials" not in markdown
    assert json.loads((out / "pool.json").read_text())["sources"][1]["folder"] == str(part2)
    assert (out / "plots" / "metric.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part1", "part2", "pooled"]  # no staging left


def test_collapsed_trials_are_named_and_parts_reported_before_the_flag_are_said_to_lack_it(tmp_path: Path) -> None:
    part1 = _study(tmp_path / "part1", _spec("core", [0, 1, 2]), [])
    report = json.loads((part1 / "report.json").read_text())
    for row in report["trials"]:  # as reports were written before they carried the flag
        del row["collapsed"]
    (part1 / "report.json").write_text(json.dumps(report))
    part2 = _study(tmp_path / "part2", _spec("core-more", [3, 4]), [])
    report = json.loads((part2 / "report.json").read_text())
    report["trials"][1]["collapsed"] = "patch teacher uniform at step 410"
    (part2 / "report.json").write_text(json.dumps(report))

    record = pool_studies([part1, part2], tmp_path / "pooled")

    assert [source.collapse_flags for source in record.sources] == [False, True]
    markdown = (tmp_path / "pooled" / "report.md").read_text()
    assert "Part 1 was reported before sweep reports named collapsed trials" in markdown
    assert "> - selfpatch seed 3: patch teacher uniform at step 410" in markdown
    trials = json.loads((tmp_path / "pooled" / "report.json").read_text())["trials"]
    assert [t["collapsed"] for t in trials if t["collapsed"]] == ["patch teacher uniform at step 410"]


def test_code_that_changed_between_the_parts_commits_is_named(tmp_path: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if first.returncode != 0 or not first.stdout.split():
        pytest.fail("the test needs the repository's history (a git clone)")
    part1 = _study(tmp_path / "p1", _spec("core", [0]), [], commit=first.stdout.split()[-1])
    part2 = _study(tmp_path / "p2", _spec("more", [1]), [], commit=head.stdout.strip())

    record = pool_studies([part1, part2], tmp_path / "out", repo=REPO)

    assert record.code_changes and any(path.startswith("trainer/") for path in record.code_changes)
    assert all(
        path.startswith(("trainer/", "evaluator/", "orchestrator/jobs/", "configs/")) for path in record.code_changes
    )
    assert not any(path.startswith("configs/sweeps/") for path in record.code_changes)
    assert record.name == "core-pooled"


def test_the_cli_refuses_studies_that_are_not_parts_of_one_ablation(tmp_path: Path) -> None:
    part1 = _study(tmp_path / "a", _spec("core", [0, 1]), [])
    overlapping = _study(tmp_path / "b", _spec("more", [1, 2]), [])
    unfinished = _study(tmp_path / "c", _spec("late", [3]), [])
    report = json.loads((unfinished / "report.json").read_text())
    (unfinished / "report.json").write_text(json.dumps(report | {"partial": True}))
    out = tmp_path / "out"

    fine = _study(tmp_path / "d", _spec("more", [2]), [])
    for parts, extra, reason in (
        ([part1, overlapping], [], "error: more repeats seed 1 of core: pooled seeds must differ"),
        ([part1, unfinished], [], f"error: {unfinished}: the study has unfinished trials; pool finished studies only"),
        ([part1, tmp_path / "none"], [], f"error: {tmp_path / 'none'} is not a study's evidence folder"),
        ([part1, fine], ["--name", "../x y"], "error: --name '../x y': letters, digits and _.- only"),
    ):
        command = [sys.executable, "-m", "api.shell.cli", "study-pool", *map(str, parts), "--out", str(out), *extra]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.strip().startswith(reason) and len(done.stderr.strip().splitlines()) == 1
        assert not out.exists()
