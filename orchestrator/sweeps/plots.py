"""Figures of a sweep as PNG or SVG bytes, for MLflow artifacts and HTTP responses.

Each figure draws every seed next to the summary so three points are never mistaken for a distribution.
Figures are built on a Figure with an Agg canvas, never through pyplot: no display, no global figure
state shared between the service's threads. matplotlib and numpy are imported inside the functions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from orchestrator.sweeps.stats import CONFIDENCE, MetricReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Format = Literal["png", "svg"]
BASELINE_COLOR = "0.35"


def metric_plot(
    report: MetricReport, fmt: Format = "png", knob: Mapping[str, float] | None = None, knob_name: str = "knob"
) -> bytes:
    """Mean and t interval per arm with every seed as a dot; against the knob's value when `knob` is given.

    Arms without a (finite) knob value are left out and named in the figure, not placed at a made-up x.
    """
    fig = _figure(width=max(5.0, 1.1 * len(report.arms) + 2.5))
    ax = fig.add_subplot()
    colors = _colors([a.arm for a in report.arms], report.baseline)
    note = ""
    if knob is None:
        x = {a.arm: float(i) for i, a in enumerate(report.arms)}
        spread = 0.08
    else:
        x = {a.arm: float(knob[a.arm]) for a in report.arms if a.arm in knob and math.isfinite(float(knob[a.arm]))}
        span = (max(x.values()) - min(x.values())) if len(x) > 1 else 1.0
        spread = 0.015 * (span or 1.0)
    means: list[tuple[float, float]] = []
    for a in report.arms:
        if a.arm not in x:
            continue
        seeds = list(a.values.values())
        ax.scatter(_jitter(x[a.arm], len(seeds), spread), seeds, s=18, alpha=0.55, color=colors[a.arm], zorder=2)
        if a.mean is None:
            continue
        means.append((x[a.arm], a.mean))
        yerr = None
        if a.ci_low is not None and a.ci_high is not None:
            yerr = [[a.mean - a.ci_low], [a.ci_high - a.mean]]
        ax.errorbar([x[a.arm]], [a.mean], yerr=yerr, fmt="D", ms=6, capsize=5, color=colors[a.arm], zorder=3)
    if knob is None:
        ax.set_xticks(list(x.values()), [_arm_label(a.arm, report.baseline) for a in report.arms])
        ax.set_xlim(-0.6, len(report.arms) - 0.4)
        if len(report.arms) > 4:
            ax.tick_params(axis="x", labelrotation=30)
    else:
        ax.set_xlabel(knob_name)
        if len(means) > 1:
            xs, ys = zip(*sorted(means), strict=True)
            ax.plot(xs, ys, color="C0", alpha=0.7, zorder=1)
        for a in report.arms:
            if a.arm in x:
                y = a.mean if a.mean is not None else max(a.values.values(), default=0.0)
                ax.annotate(a.arm, (x[a.arm], y), xytext=(6, 4), textcoords="offset points", fontsize=7, alpha=0.8)
        left_out = [a.arm for a in report.arms if a.arm not in x]
        if left_out:
            note = f"\nnot drawn, no {knob_name} value: {', '.join(left_out)}"
    if not means:
        _empty(ax, "no values yet")
    ax.set_ylabel(report.metric)
    title = f"{report.metric} ({_better(report)})\nmean ± {CONFIDENCE:.0%} t CI, dots are seeds"  # fits 2 arms
    ax.set_title(title + note, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _render(fig, fmt)


def differences_plot(report: MetricReport, fmt: Format = "png") -> bytes:
    """Paired differences (arm - baseline) per seed, their mean with the t interval, a zero line and the verdict."""
    fig = _figure(width=6.5, height=max(2.5, 0.7 * len(report.comparisons) + 1.6))
    ax = fig.add_subplot()
    values = {a.arm: a.values for a in report.arms}
    base = values.get(report.baseline, {})
    colors = _colors([a.arm for a in report.arms], report.baseline)
    ax.axvline(0.0, color="0.4", lw=1, ls="--", zorder=1)
    # Holm here is over this metric's arms only: with one arm it corrects nothing, and the label says so, so
    # the figure is not read as a study's correction over all its metrics
    several = len(report.comparisons) > 1
    for y, c in enumerate(report.comparisons):
        ours = values.get(c.arm, {})
        diffs = [ours[s] - base[s] for s in sorted(ours.keys() & base.keys())]
        ax.scatter(diffs, _jitter(float(y), len(diffs), 0.08), s=18, alpha=0.55, color=colors[c.arm], zorder=2)
        if c.mean_diff is None:
            continue
        xerr = None
        if c.ci_low is not None and c.ci_high is not None:
            xerr = [[c.mean_diff - c.ci_low], [c.ci_high - c.mean_diff]]
        ax.errorbar([c.mean_diff], [y], xerr=xerr, fmt="D", ms=6, capsize=5, color=colors[c.arm], zorder=3)
        mark = {"not significant": "n.s.", "undetermined": "no test"}.get(c.verdict, c.verdict)
        p = ""
        if c.p is not None and c.p_holm is not None:
            p = f"  (p = {c.p:.3g}, Holm p = {c.p_holm:.3g})" if several else f"  (p = {c.p:.3g}, uncorrected)"
        ax.annotate(f"{mark}{p}", (c.mean_diff, y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=7)
    ax.set_yticks(range(len(report.comparisons)), [c.arm for c in report.comparisons])
    ax.set_ylim(-0.7, max(len(report.comparisons), 1) - 0.3)
    ax.invert_yaxis()
    if not report.comparisons or all(c.mean_diff is None for c in report.comparisons):
        _empty(ax, "no paired differences yet")
    arrow = "→ better" if report.direction == "max" else "← better"
    ax.set_xlabel(f"{report.metric}: arm − {report.baseline}   ({arrow})")
    ax.set_title(
        f"paired difference vs {report.baseline}: mean ± {CONFIDENCE:.0%} t CI, dots are seeds\n"
        f"verdicts at α = {report.alpha:g}, Holm across this metric's arms only, not across metrics",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    return _render(fig, fmt)


def curves_plot(
    curves: Mapping[str, Mapping[int, Sequence[tuple[int, float]]]],
    metric: str,
    fmt: Format = "png",
    x_label: str = "step",
) -> bytes:
    """Per arm: every seed's curve faintly, the mean over seeds and its min-max band on the steps all seeds share.

    Steps missing from some seed (or non-finite there) are left out of the mean rather than averaged over
    fewer seeds, which would make the mean jump where a seed drops out.
    """
    import numpy as np

    fig = _figure(width=7.0, height=4.2)
    ax = fig.add_subplot()
    dropped: list[str] = []
    drawn = False
    for i, (arm, by_seed) in enumerate(curves.items()):
        color = f"C{i % 10}"
        series = {seed: _clean(points) for seed, points in by_seed.items()}
        series = {seed: s for seed, s in series.items() if s}
        for s in series.values():
            ax.plot(list(s), list(s.values()), color=color, alpha=0.25, lw=0.8)
            drawn = True
        if not series:
            continue
        shared = sorted(set.intersection(*(set(s) for s in series.values())))
        every = set().union(*(set(s) for s in series.values()))
        if len(every) > len(shared):
            dropped.append(f"{arm}: {len(every) - len(shared)}")
        if not shared:
            continue
        grid = np.array([[s[step] for step in shared] for s in series.values()])
        label = f"{arm} (mean of {len(series)} seed{'s' if len(series) != 1 else ''})"
        ax.plot(shared, grid.mean(axis=0), color=color, lw=2, label=label)
        if len(series) > 1:
            ax.fill_between(shared, grid.min(axis=0), grid.max(axis=0), color=color, alpha=0.18, lw=0)
    if drawn:
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no curves yet")
    title = f"{metric}: mean over seeds, band min-max, faint lines are seeds"
    if dropped:
        title += f"\nsteps not shared by all seeds, left out of the mean: {'; '.join(dropped)}"
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _render(fig, fmt)


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _render(fig: Figure, fmt: Format) -> bytes:
    """Bytes of the figure, without a date stamp. rcParams stay untouched: they are global to the process,
    and the service draws from several threads at once."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"format must be 'png' or 'svg', got {fmt!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else {})
    return buffer.getvalue()


def _colors(arms: list[str], baseline: str) -> dict[str, str]:
    """The baseline in grey, the other arms in the default cycle, the same colour for an arm in every figure."""
    others = [a for a in arms if a != baseline]
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(others)}
    colors[baseline] = BASELINE_COLOR
    return colors


def _jitter(center: float, n: int, spread: float) -> list[float]:
    """Evenly spread positions (not random: the same data gives the same picture)."""
    if n <= 1:
        return [center] * n
    return [center - spread + 2 * spread * i / (n - 1) for i in range(n)]


def _clean(points: Sequence[tuple[int, float]]) -> dict[int, float]:
    """step -> value in step order; the last value of a repeated step wins, and a non-finite one means none."""
    out: dict[int, float] = {}
    for step, value in points:
        if math.isfinite(float(value)):
            out[int(step)] = float(value)
        else:
            out.pop(int(step), None)
    return dict(sorted(out.items()))


def _arm_label(arm: str, baseline: str) -> str:
    return f"{arm}\n(baseline)" if arm == baseline else arm


def _better(report: MetricReport) -> str:
    return "higher is better" if report.direction == "max" else "lower is better"


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, alpha=0.7)
