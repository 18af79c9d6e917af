"""Pooling studies: one analysis over the seeds of several finished studies of the same ablation.

A study that needs more seeds than one session's budget runs as several studies with disjoint seeds (the
second sweep file differs from the first only in `seeds`). Pooling reads their evidence folders, checks
that they would have been one sweep (`orchestrator.sweeps.spec.pooled`), and analyses every trial together
with the same statistics a single sweep gets. What could make the parts incomparable is written down, not
hidden: each part's code commit, the files under the trainer, the evaluator, the job runners and the presets
that differ between those commits, and whether the parts' floors agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from api.shell.study import Floor, floors_markdown, summary_markdown

if TYPE_CHECKING:
    from orchestrator.sweeps.report import SweepReport, TrialRow
    from orchestrator.sweeps.spec import SweepSpec

#: What decides a trial's numbers besides its sweep file: the code that trains, probes and runs the jobs,
#: and the presets the sweeps name (git pathspecs from the repository's top).
SCIENCE_PATHS = (":(top)trainer", ":(top)evaluator", ":(top)orchestrator/jobs", ":(top,glob)configs/*.yaml")

#: Floors of two parts that differ by more than this (in metric points) are reported as disagreeing.
FLOOR_TOLERANCE = 1e-6


@dataclass
class PoolSource:
    """One pooled study, as its `study.json` and sweep file describe it."""

    folder: str
    sweep_id: str
    name: str
    spec_hash: str
    seeds: list[int]
    commit: str
    dirty: bool
    sweep_wall_s: float
    #: whether its report says which trials the trainer flagged as collapsed (reports before the flag do not)
    collapse_flags: bool = True


@dataclass
class PoolRecord:
    """What `pool.json` says: the parts, the pooled spec, and what differs between the parts."""

    name: str
    spec_hash: str
    seeds: list[int]
    sources: list[PoolSource]
    code_changes: list[str] | None
    floors: list[Floor]
    floor_disagreements: list[str]
    created: str


def pool_studies(folders: list[Path], out: Path, name: str | None = None, repo: Path | None = None) -> PoolRecord:
    """Analyse the studies in `folders` as one and write the pooled evidence folder `out` in one rename;
    `repo` (default: the working directory) is the clone whose history compares the parts' commits.

    Raises ValueError with a one-line reason when a folder is not a finished study or the studies are not
    parts of one ablation; nothing is written then.
    """
    from pydantic import TypeAdapter, ValidationError

    from orchestrator.sweeps.report import ablation_report
    from orchestrator.sweeps.spec import SweepName, pooled

    if name is not None:
        try:
            TypeAdapter(SweepName).validate_python(name)
        except ValidationError:
            raise ValueError(
                f"--name {name!r}: letters, digits and _.- only, starting with a letter or digit"
            ) from None

    parts = [_read_part(folder) for folder in folders]
    specs = [spec for spec, _, _ in parts]
    spec = pooled(specs)
    spec = spec.model_copy(update={"name": name or f"{specs[0].name}-pooled"})
    trials = [_trial(row) for _, report, _ in parts for row in report["trials"]]
    sweep_ids = ",".join(report["sweep_id"] for _, report, _ in parts)
    report = ablation_report(spec, sweep_ids, trials, [arm.name for arm in spec.arm_list])
    sources = [
        PoolSource(
            folder=str(folder),
            sweep_id=record["sweep_id"],
            name=record["name"],
            spec_hash=record["spec_hash"],
            seeds=part_spec.seed_list,
            commit=record["commit"],
            dirty=bool(record["dirty"]),
            sweep_wall_s=float(record["sweep_wall_s"]),
            collapse_flags=all("collapsed" in row for row in part_report["trials"]),
        )
        for folder, part_spec, (_, part_report, record) in zip(folders, specs, parts, strict=True)
    ]
    floors, disagreements = _floors([[Floor(**f) for f in record.get("floors", [])] for _, _, record in parts])
    pool = PoolRecord(
        name=spec.name,
        spec_hash=spec.spec_hash(),
        seeds=spec.seed_list,
        sources=sources,
        code_changes=code_changes([s.commit for s in sources], repo or Path.cwd()),
        floors=floors,
        floor_disagreements=disagreements,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    report_json = report.to_json()
    files: dict[str, str | bytes] = {
        "sweep.yaml": _pooled_yaml(spec, sources),
        "report.json": json.dumps(report_json, indent=2, allow_nan=False) + "\n",
        "report.csv": report.to_csv(),
        "report.md": _header(pool)
        + summary_markdown(report_json, floors)
        + report.to_markdown().rstrip()
        + "\n\n"
        + floors_markdown(floors),
        "pool.json": json.dumps(asdict(pool), indent=2) + "\n",
    }
    files.update(_plots(report))
    _write_folder(out, files)
    return pool


def code_changes(commits: list[str], repo: Path) -> list[str] | None:
    """Files that decide the numbers and differ between the first commit and any other; None when git
    cannot tell (a commit unknown or missing from this clone)."""
    changed: dict[str, None] = {}
    for commit in commits[1:]:
        done = subprocess.run(
            ["git", "diff", "--name-only", commits[0], commit, "--", *SCIENCE_PATHS],
            cwd=repo,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            return None
        changed.update(dict.fromkeys(done.stdout.split()))
    return sorted(changed)


def _read_part(folder: Path) -> tuple[SweepSpec, dict[str, Any], dict[str, Any]]:
    """A finished study's sweep file (validated), report and record."""
    from orchestrator.sweeps.spec import load_spec
    from trainer.presets import ConfigError

    paths = [folder / "sweep.yaml", folder / "report.json", folder / "study.json"]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{folder} is not a study's evidence folder: {path.name} is missing")
    try:
        spec = load_spec(paths[0])
    except ConfigError as exc:
        raise ValueError(f"{paths[0]}: {exc}") from exc
    report, record = (json.loads(path.read_text()) for path in paths[1:])
    if report.get("partial"):
        raise ValueError(f"{folder}: the study has unfinished trials; pool finished studies only")
    if "trials" not in report:
        raise ValueError(f"{folder}: report.json lists no trials (a search report cannot be pooled)")
    return spec, report, record


def _trial(row: dict[str, Any]) -> TrialRow:
    """A trial as its report wrote it, with the null that stood for a non-finite value back as NaN."""
    from orchestrator.sweeps.report import TrialRow

    metrics = {key: float("nan") if value is None else float(value) for key, value in row["metrics"].items()}
    return TrialRow(**{**row, "metrics": metrics})


def _floors(parts: list[list[Floor]]) -> tuple[list[Floor], list[str]]:
    """The first part's floors, and every floor another part measured differently (or not at all)."""
    first = {(f.metric, f.baseline): f.value for f in parts[0]}
    disagreements = []
    for index, floors in enumerate(parts[1:], start=2):
        other = {(f.metric, f.baseline): f.value for f in floors}
        for key in sorted(first.keys() | other.keys()):
            a, b = first.get(key), other.get(key)
            if a is None or b is None or abs(a - b) > FLOOR_TOLERANCE:
                disagreements.append(f"{key[0]} {key[1]}: part 1 {_num(a)}, part {index} {_num(b)}")
    return parts[0], disagreements


def _header(record: PoolRecord) -> str:
    rows = [
        "| part | sweep | seeds | code commit | sweep wall time |",
        "|---:|---|---|---|---:|",
    ]
    for index, source in enumerate(record.sources, start=1):
        commit = source.commit[:12] + (" with local changes" if source.dirty else "")
        seeds = ", ".join(str(s) for s in source.seeds)
        rows.append(f"| {index} | `{source.name}` | {seeds} | `{commit}` | {source.sweep_wall_s / 60:.1f} min |")
    if record.code_changes is None:
        code = "Whether the code that trains and probes differs between the parts' commits is unknown (a commit is "
        code += "missing from this clone)."
    elif record.code_changes:
        code = "Files that decide the numbers and differ between the parts' commits: "
        code += ", ".join(f"`{path}`" for path in record.code_changes) + "."
    else:
        code = "The trainer, the evaluator, the job runners and the presets are identical at every part's commit."
    floors = (
        "Floors agree across the parts."
        if not record.floor_disagreements
        else "Floors differ between the parts (the first part's are shown): " + "; ".join(record.floor_disagreements)
    )
    unflagged = [str(index) for index, source in enumerate(record.sources, start=1) if not source.collapse_flags]
    collapse = (
        f" Part {', '.join(unflagged)} was reported before sweep reports named collapsed trials: a trial of it whose "
        "head collapsed is not marked here (its training log says)."
        if unflagged
        else ""
    )
    return (
        f"# Pooled study: {record.name}\n\n"
        f"{len(record.sources)} studies of one ablation with disjoint seeds, analysed as one sweep with seeds "
        f"{', '.join(str(s) for s in record.seeds)} (`sweep.yaml`, spec {record.spec_hash[:12]}: run it to "
        "train every seed at once). Training curves are in each part's folder.\n\n"
        + "\n".join(rows)
        + f"\n\n{code} {floors}{collapse}\n\n"
    )


def _pooled_yaml(spec: SweepSpec, sources: list[PoolSource]) -> str:
    parts = "; ".join(f"{s.name} (seeds {', '.join(str(x) for x in s.seeds)})" for s in sources)
    body = yaml.safe_dump(spec.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
    return f"# Written by `orchestrator study-pool`: the one sweep that pools {parts}.\n{body}"


def _plots(report: SweepReport) -> dict[str, str | bytes]:
    from orchestrator.sweeps.plots import differences_plot, metric_plot

    files: dict[str, str | bytes] = {}
    for fmt in ("png", "svg"):
        files[f"plots/metric.{fmt}"] = metric_plot(report.primary, fmt)
        files[f"plots/differences.{fmt}"] = differences_plot(report.primary, fmt)
    return files


def _write_folder(out: Path, files: dict[str, str | bytes]) -> None:
    """Every file into a fresh sibling folder, then one rename: a reader never sees half a folder."""
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for relative, content in files.items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
