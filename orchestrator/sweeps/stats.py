"""The statistics of a sweep: per-arm summaries and paired comparisons of each arm against a baseline.

Trials of two arms that share a seed are paired: the per-seed difference removes what the seed alone
changes, which with three seeds is often larger than the effect being measured. The numbers come from
scipy and statsmodels; this module decides what is defined for the data at hand and says so in a warning
when something is not, instead of raising or printing a number that means nothing.

scipy, statsmodels and numpy are imported inside the functions: the REST service imports this module and
must stay light.
"""

from __future__ import annotations

import math
import statistics
import sys
import warnings as pywarnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

Direction = Literal["max", "min"]

#: Level of every interval in a report (the t intervals and the bootstrap).
CONFIDENCE = 0.95
#: Bootstrap resamples: enough that the interval's ends do not move with the resampling seed.
N_RESAMPLES = 9999
#: Below this many values an interval is too wide to read, normality cannot be checked, and no bootstrap is run.
MIN_SEEDS = 3
#: Below this many pairs the bootstrap distribution has few distinct values and its interval is too narrow.
COARSE_BOOTSTRAP = 10


@dataclass(frozen=True)
class Observation:
    """One finished trial's value of one metric."""

    arm: str
    seed: int
    value: float


@dataclass(frozen=True)
class ArmSummary:
    """One arm's values of one metric; the interval is a 95% t interval of the mean."""

    arm: str
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: dict[int, float]


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline, paired by seed; differences are arm - baseline."""

    arm: str
    baseline: str
    pairs: int
    missing: list[int]
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    boot_low: float | None
    boot_high: float | None
    t: float | None
    p: float | None
    p_holm: float | None
    effect_size: float | None
    better: bool | None
    significant: bool

    @property
    def verdict(self) -> str:
        """What a reader may conclude: "better" or "worse" only when the Holm-adjusted test says so."""
        if self.p_holm is None:
            return "undetermined"
        if not self.significant:
            return "not significant"
        return "better" if self.better else "worse"


@dataclass(frozen=True)
class MetricReport:
    """Everything measured about one metric: arm summaries, comparisons with the baseline, and caveats."""

    metric: str
    direction: Direction
    baseline: str
    alpha: float
    arms: list[ArmSummary]
    comparisons: list[Comparison]
    warnings: list[str]


def analyse(
    metric: str,
    observations: Sequence[Observation],
    arms: Sequence[str],
    baseline: str,
    direction: Direction = "max",
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricReport:
    """Summarise every arm and compare every other arm with the baseline, Holm-adjusted across those arms.

    Odd data (empty or single-value arms, unpaired seeds, non-finite values, differences without spread, no
    baseline values) gives None where a number is undefined and a warning that says why. Arguments that
    describe an impossible sweep (baseline not an arm, repeated arms, bad direction or alpha) raise
    ValueError: those are the caller's bug, not the data's.
    """
    arm_list = list(arms)
    _check_arguments(arm_list, baseline, direction, alpha)
    notes: list[str] = []
    values = _collect(observations, arm_list, notes)
    summaries = [_summarise(arm, values[arm], notes) for arm in arm_list]
    if not values[baseline] and len(arm_list) > 1:
        notes.append(f"baseline {baseline!r} has no values: no arm can be compared with it")
    raw = [
        _compare(arm, baseline, values[arm], values[baseline], direction, seed, notes)
        for arm in arm_list
        if arm != baseline
    ]
    adjusted = holm([c.p for c in raw])
    comparisons = [
        replace(c, p_holm=q, significant=q is not None and q < alpha) for c, q in zip(raw, adjusted, strict=True)
    ]
    coarse = sorted({c.pairs for c in comparisons if c.boot_low is not None and c.pairs < COARSE_BOOTSTRAP})
    if coarse:
        pairs = ", ".join(str(k) for k in coarse)
        notes.append(
            f"bootstrap intervals from {pairs} pairs rest on few distinct resamples and tend to be too narrow; "
            "read the t interval"
        )
    return MetricReport(metric, direction, baseline, alpha, summaries, comparisons, notes)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values over the whole family of planned comparisons.

    A comparison without a p-value (too few pairs, no spread) still counts in the family, as p = 1: the
    family is what was planned, so a missing arm must not make the others look stronger. It gets None back.
    """
    if all(p is None for p in pvalues):
        return [None] * len(pvalues)
    from statsmodels.stats.multitest import multipletests  # type: ignore[import-untyped]

    family = [1.0 if p is None else float(p) for p in pvalues]
    adjusted = multipletests(family, method="holm")[1]
    return [None if p is None else float(q) for p, q in zip(pvalues, adjusted, strict=True)]


def _check_arguments(arms: list[str], baseline: str, direction: str, alpha: float) -> None:
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms must be distinct, got {arms}")
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {arms}")
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")


def _collect(observations: Sequence[Observation], arms: list[str], notes: list[str]) -> dict[str, dict[int, float]]:
    """seed -> value per arm, without non-finite values; the last of repeated (arm, seed) values wins."""
    values: dict[str, dict[int, float]] = {arm: {} for arm in arms}
    strangers: dict[str, int] = {}
    for obs in observations:
        if obs.arm not in values:
            strangers[obs.arm] = strangers.get(obs.arm, 0) + 1
            continue
        try:
            value = float(obs.value)
        except (TypeError, ValueError):
            notes.append(f"arm {obs.arm!r} seed {obs.seed}: value {obs.value!r} is not a number and was dropped")
            continue
        if not math.isfinite(value):
            notes.append(f"arm {obs.arm!r} seed {obs.seed}: value {value} is not finite and was dropped")
            continue
        if obs.seed in values[obs.arm]:
            notes.append(f"arm {obs.arm!r} seed {obs.seed}: several values; the last one given is used")
        values[obs.arm][obs.seed] = value
    if strangers:
        listed = ", ".join(f"{arm!r} ({count})" for arm, count in strangers.items())
        notes.append(f"values of arms outside the sweep were ignored: {listed}")
    return {arm: dict(sorted(by_seed.items())) for arm, by_seed in values.items()}


def _summarise(arm: str, by_seed: dict[int, float], notes: list[str]) -> ArmSummary:
    n = len(by_seed)
    if n == 0:
        notes.append(f"arm {arm!r} has no values")
        return ArmSummary(arm, 0, None, None, None, None, {})
    data = list(by_seed.values())
    mean = float(statistics.mean(data))
    if n == 1:
        notes.append(f"arm {arm!r} has 1 value (seed {next(iter(by_seed))}): no spread and no interval")
        return ArmSummary(arm, 1, mean, None, None, None, by_seed)
    if n < MIN_SEEDS:
        notes.append(f"arm {arm!r} has only {n} values (fewer than {MIN_SEEDS}): its interval is very wide")
    std = float(statistics.stdev(data))
    if std == 0.0:
        notes.append(f"arm {arm!r}: all {n} values equal {mean:.6g}: no spread, so no interval")
        return ArmSummary(arm, n, mean, 0.0, None, None, by_seed)
    from scipy import stats  # type: ignore[import-untyped]

    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(data))
    return ArmSummary(arm, n, mean, std, _finite(low), _finite(high), by_seed)


def _compare(
    arm: str,
    baseline: str,
    ours: dict[int, float],
    theirs: dict[int, float],
    direction: Direction,
    seed: int,
    notes: list[str],
) -> Comparison:
    common = sorted(ours.keys() & theirs.keys())
    missing = sorted(ours.keys() ^ theirs.keys())
    label = f"{arm!r} vs {baseline!r}"
    if missing and ours and theirs:
        only_ours, only_theirs = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        where = "; ".join(
            f"seeds {seeds} only in {name!r}" for seeds, name in ((only_ours, arm), (only_theirs, baseline)) if seeds
        )
        notes.append(f"{label}: {where}: left out of the paired comparison")
    empty = Comparison(
        arm=arm,
        baseline=baseline,
        pairs=len(common),
        missing=missing,
        mean_diff=None,
        ci_low=None,
        ci_high=None,
        boot_low=None,
        boot_high=None,
        t=None,
        p=None,
        p_holm=None,
        effect_size=None,
        better=None,
        significant=False,
    )
    if not common:
        if ours and theirs:
            notes.append(f"{label}: no seed in common, so no paired comparison")
        return empty
    a, b = [ours[s] for s in common], [theirs[s] for s in common]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean_diff = float(statistics.mean(diffs))
    better = mean_diff > 0 if direction == "max" else mean_diff < 0
    partial = replace(empty, mean_diff=mean_diff, better=better)
    if len(common) == 1:
        notes.append(f"{label}: 1 pair (seed {common[0]}): no test and no interval")
        return partial
    # Subtraction rounds: equal true differences can differ in the last bits, which a t-test would read as
    # a near-zero variance and an absurdly small p. Anything within rounding of the inputs counts as equal.
    tolerance = 64 * sys.float_info.epsilon * max(abs(x) for x in a + b)
    if max(diffs) - min(diffs) <= tolerance:
        notes.append(
            f"{label}: all {len(diffs)} paired differences equal {mean_diff:.6g}: with no spread the t-test, "
            "its interval, the bootstrap and d_z are undefined (p is none)"
        )
        return partial
    from scipy import stats

    test = stats.ttest_rel(a, b)
    interval = test.confidence_interval(CONFIDENCE)
    boot_low, boot_high = None, None
    if len(diffs) >= MIN_SEEDS:
        boot_low, boot_high = _bootstrap(diffs, seed, label, notes)
    else:
        notes.append(f"{label}: {len(diffs)} pairs are too few for a bootstrap interval")
    return replace(
        partial,
        ci_low=_finite(interval.low),
        ci_high=_finite(interval.high),
        boot_low=boot_low,
        boot_high=boot_high,
        t=_finite(test.statistic),
        p=_finite(test.pvalue),
        effect_size=mean_diff / float(statistics.stdev(diffs)),
    )


def _bootstrap(diffs: list[float], seed: int, label: str, notes: list[str]) -> tuple[float | None, float | None]:
    """BCa interval of the mean difference; percentile where BCa is undefined (its jackknife degenerates)."""
    import numpy as np
    from scipy import stats

    data = (np.asarray(diffs, dtype=float),)
    for method in ("BCa", "percentile"):
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")
            result = stats.bootstrap(
                data,
                np.mean,
                n_resamples=N_RESAMPLES,
                confidence_level=CONFIDENCE,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = _finite(result.confidence_interval.low), _finite(result.confidence_interval.high)
        if low is not None and high is not None:
            if method != "BCa":
                notes.append(f"{label}: BCa bootstrap undefined for these differences; percentile interval used")
            return low, high
    notes.append(f"{label}: the bootstrap interval is undefined for these differences")
    return None, None


def _finite(x: object) -> float | None:
    """A plain float, or None for what is not a finite number (NaN from an undefined statistic)."""
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
