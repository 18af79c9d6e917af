"""A sweep's report: what its trials measured, what may be concluded, and what it cost.

The verdict of a comparison is "better" or "worse" only when the Holm-adjusted paired test is significant;
everything else reads "not significant" (or "undetermined" when no test is defined), so a table cannot be
read as a ranking of noise. A sweep with unfinished trials is marked partial in every format.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.lifecycle import TERMINAL, Status
from orchestrator.sweeps.stats import CONFIDENCE, ArmSummary, Comparison, Direction, MetricReport, Observation, analyse

if TYPE_CHECKING:
    from orchestrator.sweeps.spec import SweepSpec

_TERMINAL = frozenset(str(s) for s in TERMINAL)
_SUCCEEDED = str(Status.SUCCEEDED)

CSV_COLUMNS = (
    "metric",
    "role",
    "direction",
    "baseline",
    "alpha",
    "arm",
    "is_baseline",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "values",
    "pairs",
    "missing",
    "mean_diff",
    "diff_ci_low",
    "diff_ci_high",
    "boot_low",
    "boot_high",
    "t",
    "p",
    "p_holm",
    "effect_size",
    "better",
    "significant",
    "verdict",
    "partial",
)


@dataclass(frozen=True)
class TrialRow:
    """What the sweep service knows about one trial."""

    arm: str
    seed: int
    status: str
    run_id: str
    metrics: dict[str, float]
    accelerator_seconds: float
    collapsed: str | None = None  # why the trainer flagged the run as collapsed (its values still count)


@dataclass(frozen=True)
class SweepReport:
    """The analysed sweep, renderable as JSON, Markdown, CSV or a terminal table."""

    sweep: str
    sweep_id: str
    primary: MetricReport
    secondary: list[MetricReport]
    partial: bool
    trials: list[TrialRow]
    accelerator_hours: dict[str, float]
    budget_hours: float | None

    @property
    def metrics(self) -> list[MetricReport]:
        return [self.primary, *self.secondary]

    def status_counts(self) -> dict[str, int]:
        """Trials per status, in lifecycle order, so a reader sees at once how much of the sweep is in."""
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        order = {str(s): i for i, s in enumerate(Status)}
        return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: None and non-finite numbers are null, seeds are string keys, keys in a fixed order."""
        return {
            "sweep": self.sweep,
            "sweep_id": self.sweep_id,
            "partial": self.partial,
            "confidence": CONFIDENCE,
            "status_counts": self.status_counts(),
            "primary": _metric_json(self.primary),
            "secondary": [_metric_json(m) for m in self.secondary],
            "accelerator_hours": _plain(self.accelerator_hours),
            "budget_hours": _plain(self.budget_hours),
            "budget_used": _plain(self._budget_used()),
            "trials": [_plain(t) for t in self.trials],
        }

    def to_markdown(self) -> str:
        """Tables per metric (arms; paired differences with verdicts; per-seed values), warnings, and cost."""
        out = [f"# Sweep `{_md(self.sweep)}` ({_md(self.sweep_id)})", ""]
        counts = ", ".join(f"{n} {status}" for status, n in self.status_counts().items()) or "none"
        if self.partial:
            out += [
                "> **PARTIAL**: some trials have not finished; every number below is provisional.",
                "",
            ]
        out += [f"Trials: {len(self.trials)} ({counts}). Only succeeded trials contribute values.", ""]
        flagged = [t for t in self.trials if t.collapsed]
        if flagged:
            out += [
                "> **Collapsed**: the trainer flagged these runs; their values count, as what the setting gives, "
                "but a head that collapsed explains them:",
                *(f"> - {_md(t.arm)} seed {t.seed}: {_md(t.collapsed or '')}" for t in flagged),
                "",
            ]
        for role, report in self._roles():
            out += self._metric_markdown(role, report)
        if self.secondary:
            out += [
                "Secondary metrics are exploratory: Holm corrects across the arms within each metric, "
                "not across metrics.",
                "",
            ]
        out += ["## Accelerator hours", "", "| arm | hours |", "|---|---:|"]
        for arm, hours in self.accelerator_hours.items():
            shown = f"**{_num(hours)}**" if arm == "total" else _num(hours)
            out.append(f"| {_md(arm)} | {shown} |")
        if self.budget_hours is not None:
            used = self._budget_used()
            share = f" ({used:.0%} used)" if used is not None else ""
            out.append(f"| budget | {_num(self.budget_hours)}{share} |")
        out.append("")
        return "\n".join(out)

    def to_csv(self) -> str:
        """One row per (metric, arm) with every number; comparison columns are empty on the baseline's row."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for role, report in self._roles():
            by_arm = {c.arm: c for c in report.comparisons}
            for summary in report.arms:
                writer.writerow(_csv_row(role, report, summary, by_arm.get(summary.arm), self.partial))
        return buffer.getvalue()

    def to_rich(self) -> Any:
        """A rich Group for the terminal: partial in red at the top, non-significant rows dimmed."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = [Text(f"Sweep {self.sweep} ({self.sweep_id})", style="bold")]
        if self.partial:
            parts.append(Text("PARTIAL: some trials have not finished; numbers are provisional", style="bold red"))
        counts = ", ".join(f"{n} {status}" for status, n in self.status_counts().items()) or "none"
        parts.append(Text(f"Trials: {len(self.trials)} ({counts})"))
        for role, report in self._roles():
            arrow = "higher" if report.direction == "max" else "lower"
            title = f"{role}: {report.metric} ({arrow} is better, baseline {report.baseline}, α = {report.alpha:g})"
            table = Table(title=title, title_justify="left")
            for column in ("arm", "n", "mean ± 95% CI", "diff vs baseline", "95% t CI", "p", "Holm p", "d_z"):
                table.add_column(column, justify="left" if column == "arm" else "right")
            table.add_column("verdict")
            by_arm = {c.arm: c for c in report.comparisons}
            for summary in report.arms:
                c = by_arm.get(summary.arm)
                cells = [summary.arm, str(summary.n), _mean_ci(summary)]
                if c is None:
                    table.add_row(*cells, "", "", "", "", "", "baseline", style="bold")
                    continue
                style = {"better": "green", "worse": "red"}.get(c.verdict, "dim")
                table.add_row(
                    *cells,
                    _signed(c.mean_diff),
                    _interval(c.ci_low, c.ci_high),
                    _p(c.p),
                    _p(c.p_holm),
                    _num(c.effect_size, 3),
                    c.verdict,
                    style=style,
                )
            parts.append(table)
            parts.extend(Text(f"! {w}", style="yellow") for w in report.warnings)
        hours = ", ".join(f"{arm} {_num(h)}" for arm, h in self.accelerator_hours.items())
        budget = f" of a {_num(self.budget_hours)} h budget" if self.budget_hours is not None else ""
        parts.append(Text(f"Accelerator hours: {hours}{budget}"))
        return Group(*parts)

    def _roles(self) -> list[tuple[str, MetricReport]]:
        return [("primary", self.primary), *(("secondary", m) for m in self.secondary)]

    def _budget_used(self) -> float | None:
        if not self.budget_hours or self.budget_hours <= 0:
            return None
        return self.accelerator_hours.get("total", 0.0) / self.budget_hours

    def _metric_markdown(self, role: str, report: MetricReport) -> list[str]:
        arrow = "higher" if report.direction == "max" else "lower"
        level = f"{CONFIDENCE:.0%}"
        out = [
            f"## {role.capitalize()} metric: `{_md(report.metric)}`",
            "",
            f"{arrow.capitalize()} is better. Baseline `{_md(report.baseline)}`, α = {report.alpha:g}; "
            f"intervals are {level}.",
            "",
            f"### Arms ({level} t interval of the mean)",
            "",
            "| arm | n | mean | std | CI low | CI high |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in report.arms:
            name = f"{_md(s.arm)} (baseline)" if s.arm == report.baseline else _md(s.arm)
            out.append(f"| {name} | {s.n} | {_num(s.mean)} | {_num(s.std)} | {_num(s.ci_low)} | {_num(s.ci_high)} |")
        out += [
            "",
            f"### Paired difference vs baseline (arm − {_md(report.baseline)}, Holm across arms)",
            "",
            "| arm | pairs | mean diff | t CI | bootstrap CI | t | p | Holm p | d_z | verdict |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in report.comparisons:
            verdict = f"**{c.verdict}**" if c.verdict in ("better", "worse") else c.verdict
            out.append(
                f"| {_md(c.arm)} | {c.pairs} | {_signed(c.mean_diff)} | {_interval(c.ci_low, c.ci_high)} | "
                f"{_interval(c.boot_low, c.boot_high)} | {_num(c.t, 3)} | {_p(c.p)} | {_p(c.p_holm)} | "
                f"{_num(c.effect_size, 3)} | {verdict} |"
            )
        if not report.comparisons:
            out.append("| (no other arm) | | | | | | | | | |")
        out += ["", *self._seed_table(report)]
        if report.warnings:
            out += ["### Warnings", "", *(f"- {_md(w)}" for w in report.warnings), ""]
        return out

    def _seed_table(self, report: MetricReport) -> list[str]:
        """Every seed's value, or why it has none, so a mean of two can be told from a mean of three."""
        seeds = sorted({t.seed for t in self.trials} | {s for a in report.arms for s in a.values})
        if not seeds:
            return []
        status: dict[tuple[str, int], str] = {}
        for trial in self.trials:
            if status.get((trial.arm, trial.seed)) != _SUCCEEDED:
                status[(trial.arm, trial.seed)] = trial.status
        out = [
            "### Values per seed",
            "",
            "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---:|" * len(seeds),
        ]
        for a in report.arms:
            cells = [_num(a.values[s]) if s in a.values else _no_value(status.get((a.arm, s))) for s in seeds]
            out.append(f"| {_md(a.arm)} | " + " | ".join(cells) + " |")
        return [*out, ""]


def build_report(
    sweep: str,
    sweep_id: str,
    trials: Sequence[TrialRow],
    arms: Sequence[str],
    baseline: str,
    primary: str,
    direction: Direction,
    secondary: Sequence[str] = (),
    budget_hours: float | None = None,
    alpha: float = 0.05,
    directions: Mapping[str, Direction] | None = None,
) -> SweepReport:
    """Analyse the succeeded trials' metrics; `directions` gives secondary metrics their own direction.

    A secondary metric without one takes the primary's, with a warning: "better" means nothing otherwise.
    """
    rows = list(trials)
    arm_list = list(arms)
    directions = dict(directions or {})
    primary_report = _analyse_metric(primary, direction, rows, arm_list, baseline, alpha)
    secondary_reports = []
    for metric in dict.fromkeys(secondary):
        if metric == primary:
            continue
        given = directions.get(metric)
        report = _analyse_metric(metric, given or direction, rows, arm_list, baseline, alpha)
        if given is None:
            report = _with_warnings(report, [f"no direction given for this metric; assumed {direction!r}"])
        secondary_reports.append(report)
    return SweepReport(
        sweep=sweep,
        sweep_id=sweep_id,
        primary=primary_report,
        secondary=secondary_reports,
        partial=any(t.status not in _TERMINAL for t in rows),
        trials=rows,
        accelerator_hours=_hours(rows, arm_list),
        budget_hours=budget_hours,
    )


def ablation_report(spec: SweepSpec, sweep_id: str, trials: Sequence[TrialRow], arms: Sequence[str]) -> SweepReport:
    """The report of an ablation sweep file's trials: its baseline, metrics, alpha and budget."""
    return build_report(
        spec.name,
        sweep_id,
        trials,
        arms,
        spec.baseline_arm,
        spec.metrics.primary,
        spec.metrics.direction,
        spec.metrics.secondary,
        budget_hours=spec.budget.accelerator_hours,
        alpha=spec.metrics.alpha,
    )


def dumps(report: SweepReport) -> str:
    """The JSON form as text, for files and HTTP bodies (strict JSON: no NaN)."""
    return json.dumps(report.to_json(), allow_nan=False)


def _analyse_metric(
    metric: str, direction: Direction, trials: list[TrialRow], arms: list[str], baseline: str, alpha: float
) -> MetricReport:
    observations: list[Observation] = []
    notes: list[str] = []
    succeeded = {(t.arm, t.seed) for t in trials if t.status == _SUCCEEDED}
    for t in trials:
        if t.status != _SUCCEEDED:
            continue
        if metric in t.metrics:
            observations.append(Observation(t.arm, t.seed, t.metrics[metric]))
        else:
            notes.append(f"arm {t.arm!r} seed {t.seed} (run {t.run_id}) succeeded without a value of {metric!r}")
    notes += _absent_trials(trials, arms, succeeded)
    report = analyse(metric, observations, arms, baseline, direction=direction, alpha=alpha)
    return _with_warnings(report, notes)


def _absent_trials(trials: list[TrialRow], arms: list[str], succeeded: set[tuple[str, int]]) -> list[str]:
    """Seeds with no succeeded trial, per arm: a failed seed is missing data, not a bad score."""
    absent: dict[str, dict[str, set[int]]] = {}
    for t in trials:
        if (t.arm, t.seed) not in succeeded and t.arm in arms:
            absent.setdefault(t.arm, {}).setdefault(t.status, set()).add(t.seed)
    notes = []
    for arm in arms:
        if arm in absent:
            parts = "; ".join(f"{status}: seeds {sorted(seeds)}" for status, seeds in sorted(absent[arm].items()))
            notes.append(f"arm {arm!r} has trials without a result ({parts}): they are not in the numbers")
    return notes


def _with_warnings(report: MetricReport, extra: list[str]) -> MetricReport:
    if not extra:
        return report
    return MetricReport(
        report.metric,
        report.direction,
        report.baseline,
        report.alpha,
        report.arms,
        report.comparisons,
        [*extra, *report.warnings],
    )


def _hours(trials: list[TrialRow], arms: list[str]) -> dict[str, float]:
    """Hours per arm (every trial, failed ones too: they were paid for) and in total."""
    hours = dict.fromkeys(arms, 0.0)
    for t in trials:
        seconds = float(t.accelerator_seconds)
        hours[t.arm] = hours.get(t.arm, 0.0) + (seconds / 3600.0 if math.isfinite(seconds) else 0.0)
    hours["total"] = math.fsum(hours.values())
    return hours


def _metric_json(report: MetricReport) -> dict[str, Any]:
    out: dict[str, Any] = _plain(report)
    for comparison, plain in zip(report.comparisons, out["comparisons"], strict=True):
        plain["verdict"] = comparison.verdict
    return out


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses as dicts in field order, string keys, null for None and non-finite floats."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _csv_row(
    role: str, report: MetricReport, s: ArmSummary, c: Comparison | None, partial: bool
) -> list[str | int | float]:
    values = ";".join(f"{seed}:{v!r}" for seed, v in s.values.items())
    head: list[str | int | float] = [
        report.metric,
        role,
        report.direction,
        report.baseline,
        report.alpha,
        s.arm,
        _cell(s.arm == report.baseline),
        s.n,
        _cell(s.mean),
        _cell(s.std),
        _cell(s.ci_low),
        _cell(s.ci_high),
        values,
    ]
    if c is None:
        return [*head, *([""] * 14), _cell(partial)]
    tail = [c.mean_diff, c.ci_low, c.ci_high, c.boot_low, c.boot_high, c.t, c.p, c.p_holm, c.effect_size]
    return [
        *head,
        c.pairs,
        ";".join(str(m) for m in c.missing),
        *(_cell(x) for x in tail),
        _cell(c.better),
        _cell(c.significant),
        c.verdict,
        _cell(partial),
    ]


def _cell(x: float | bool | None) -> str:
    """Full precision for numbers, lower-case booleans, empty for undefined."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    return repr(float(x))


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4g}"


def _p(x: float | None) -> str:
    if x is None:
        return "—"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _interval(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"[{low:+.4g}, {high:+.4g}]"


def _mean_ci(s: ArmSummary) -> str:
    if s.mean is None:
        return "—"
    if s.ci_low is None or s.ci_high is None:
        return _num(s.mean)
    return f"{_num(s.mean)} ± {_num((s.ci_high - s.ci_low) / 2, 3)}"


def _no_value(status: str | None) -> str:
    """Why a seed has no value: its trial's status, or that it succeeded without a usable one."""
    if status is None:
        return "—"
    return "no value" if status == _SUCCEEDED else status
