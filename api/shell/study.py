"""A study: one sweep run to the end on the embedded service, then written down as durable evidence.

The folder it writes (`results/<name>/` by default) holds everything a reader needs to trust the numbers
and rerun them: the report (mean +- 95% CI per arm, paired differences with Holm-adjusted p), its JSON and
CSV, the plots, the exact sweep file, the floors (a random backbone of the trained shape and raw pixels,
measured on the same probes), the code commit and the wall time. Rerunning resumes the same sweep: trials
already finished are not trained again.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from api.shell.client import Client

#: Probes that have floors (a random backbone, raw pixels): the image k-NN and the patch-level probes.
FLOOR_BENCHMARKS = ("knn", "dense_linear", "knn_seg")


@dataclass
class Floor:
    """One floor measured with the evaluator's CLI: a baseline subject's value of one reported metric."""

    metric: str
    baseline: str
    value: float | None
    error: str | None = None


@dataclass
class StudyRecord:
    """What `study.json` says about how the numbers were made."""

    sweep_id: str
    name: str
    spec_hash: str
    commit: str
    dirty: bool
    started: str
    finished: str
    wall_s: float
    sweep_wall_s: float
    host: str
    floors: list[Floor] = field(default_factory=list)


def git_commit(repo: Path) -> tuple[str, bool]:
    """The checked-out commit and whether tracked files differ from it ('unknown' outside a git clone)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


def reported_metrics(spec: dict[str, Any]) -> list[str]:
    metrics = spec.get("metrics", {})
    return [str(metrics.get("primary", "")), *[str(m) for m in metrics.get("secondary", [])]]


def measure_floors(spec: dict[str, Any], checkpoint: str, cwd: Path, echo: Callable[[str], None]) -> list[Floor]:
    """Random-backbone and raw-pixel values of every reported metric of a probe that has floors, each probe
    in a child `python -m evaluator` (this process never imports torch)."""
    floors: list[Floor] = []
    wanted = reported_metrics(spec)
    for evaluation in spec.get("evaluations", []):
        benchmark = str(evaluation["benchmark"])
        if benchmark not in FLOOR_BENCHMARKS:
            continue
        overrides = [str(o) for o in evaluation.get("overrides", [])]
        for baseline in ("random", "pixels"):
            echo(f"floor: {benchmark} {' '.join(overrides)} on {baseline}")
            command = [sys.executable, "-m", "evaluator", benchmark, "--data", str(evaluation["data"])]
            command += ["--config", str(evaluation.get("config", "tiny")), "--baseline", baseline]
            command += ["--output", "json", "--progress", "off"]
            command += [*(["--checkpoint", checkpoint] if baseline == "random" else []), *overrides]
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                floors.append(Floor(f"{benchmark} {' '.join(overrides)}".strip(), baseline, None, reason))
                continue
            metrics = json.loads(done.stdout)["metrics"]
            floors += [Floor(m, baseline, float(metrics[m])) for m in wanted if m in metrics]
    return floors


def floors_markdown(floors: list[Floor]) -> str:
    """The floors as a Markdown table, beside the sweep's arms in the report."""
    if not floors:
        return ""
    rows = ["| metric | random backbone | raw pixels |", "|---|---:|---:|"]
    for metric in dict.fromkeys(f.metric for f in floors):
        cells = {f.baseline: f for f in floors if f.metric == metric}

        def cell(baseline: str, cells: dict[str, Floor] = cells) -> str:
            found = cells.get(baseline)
            if found is None:
                return "-"
            return f"failed: {found.error}" if found.value is None else f"{found.value:.2f}"

        rows.append(f"| {metric} | {cell('random')} | {cell('pixels')} |")
    note = (
        "\n\nFloors: one measurement each (the random backbone has the trained models' shape, seed 0; raw "
        "pixels use the probe's pixel patch size). A method that learns should clear both.\n"
    )
    return "## Floors\n\n" + "\n".join(rows) + note


def summary_markdown(report: dict[str, Any], floors: list[Floor]) -> str:
    """One row per metric and arm: mean and 95% CI, the paired difference against the baseline with its
    95% CI and p, that p Holm-adjusted across every metric and arm of the study (the family a reader
    scans), and the floors. The per-metric sections below keep Holm across arms only."""
    from orchestrator.sweeps.stats import holm

    metrics = [report["primary"], *report["secondary"]]
    comparisons = [(m, c) for m in metrics for c in m["comparisons"]]
    keys = [(m["metric"], c["arm"]) for m, c in comparisons]
    adjusted = dict(zip(keys, holm([c["p"] for _, c in comparisons]), strict=True))
    floor = {(f.metric, f.baseline): f.value for f in floors}

    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def interval(low: float | None, high: float | None) -> str:
        return "" if low is None or high is None else f" [{low:.2f}, {high:.2f}]"

    rows = [
        "| metric | arm | n | mean [95% CI] | diff vs baseline [95% CI] | p | Holm p (all metrics) | random | pixels |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for metric in metrics:
        by_arm = {c["arm"]: c for c in metric["comparisons"]}
        for arm in metric["arms"]:
            mean = f"{num(arm['mean'])}{interval(arm['ci_low'], arm['ci_high'])}"
            c = by_arm.get(arm["arm"])
            diff = "baseline" if c is None else f"{num(c['mean_diff'])}{interval(c['ci_low'], c['ci_high'])}"
            p = "" if c is None else num(c["p"], 3)
            q = "" if c is None else num(adjusted[(metric["metric"], arm["arm"])], 3)
            random, pixels = (num(floor.get((metric["metric"], b))) for b in ("random", "pixels"))
            cells = (metric["metric"], arm["arm"], arm["n"], mean, diff, p, q, random, pixels)
            rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "## Summary\n\n" + "\n".join(rows) + "\n\n"


def write_study(
    api: Client,
    spec_file: Path,
    spec: dict[str, Any],
    out: Path,
    started: float,
    echo: Callable[[str], None],
    follow: Callable[[Client, str], dict[str, Any]],
    floors: bool = True,
) -> StudyRecord:
    """Create (or resume) the sweep, follow it to the end, then write the evidence folder."""
    created = api.create_sweep(spec)
    sweep = created["sweep"]
    echo(f"sweep {sweep['name']} ({sweep['id']}): {len(sweep['trials'])} trials")
    final = follow(api, sweep["id"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    (out / "sweep.yaml").write_text(spec_file.read_text())
    report_json = api.sweep_report(sweep["id"], "json")
    (out / "report.json").write_text(json.dumps(report_json, indent=2) + "\n")
    (out / "report.csv").write_text(api.sweep_report(sweep["id"], "csv"))
    for stem in final["plots"]:
        for fmt in ("png", "svg"):
            (out / "plots" / f"{stem}.{fmt}").write_bytes(api.sweep_plot(sweep["id"], f"{stem}.{fmt}"))
    measured: list[Floor] = []
    if floors:
        runs = api.request("GET", f"/api/v1/sweeps/{sweep['id']}/runs")
        finished = [r for r in runs if r["status"] == "succeeded"]
        checkpoints = api.checkpoints(finished[0]["id"]) if finished else []
        if checkpoints:
            measured = measure_floors(spec, checkpoints[-1]["path"], Path.cwd(), echo)
    commit, dirty = git_commit(spec_file.resolve().parent)
    record = StudyRecord(
        sweep_id=sweep["id"],
        name=sweep["name"],
        spec_hash=sweep["spec_hash"],
        commit=commit,
        dirty=dirty,
        started=datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
        wall_s=round(time.time() - started, 1),
        sweep_wall_s=round(_seconds(final["created_at"], final["ended_at"]), 1),
        host=f"{platform.node()} ({os.cpu_count()} CPUs)",
        floors=measured,
    )
    header = (
        f"# Study: {record.name}\n\nSweep file `sweep.yaml` (spec {record.spec_hash[:12]}), code commit "
        f"`{record.commit[:12]}`{' with local changes' if dirty else ''}, wall time "
        f"{record.sweep_wall_s / 60:.1f} min from the sweep's creation to its last trial on {record.host} "
        f"(this command: {record.wall_s / 60:.1f} min, finished {record.finished}).\n\n"
    )
    report = api.sweep_report(sweep["id"], "markdown")
    summary = summary_markdown(report_json, measured)
    (out / "report.md").write_text(header + summary + report.rstrip() + "\n\n" + floors_markdown(measured))
    (out / "study.json").write_text(json.dumps(_as_json(record), indent=2) + "\n")
    return record


def _seconds(start: str, end: str | None) -> float:
    if end is None:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _as_json(record: StudyRecord) -> dict[str, Any]:
    data = dict(record.__dict__)
    data["floors"] = [f.__dict__ for f in record.floors]
    return data


def load_spec(path: Path) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep file is a mapping")
    return spec
