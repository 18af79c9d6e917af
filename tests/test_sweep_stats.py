"""The sweep statistics against known answers: scipy and statsmodels called directly, and values by hand."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from orchestrator.sweeps.stats import CONFIDENCE, N_RESAMPLES, Observation, analyse, holm

REPO = Path(__file__).resolve().parent.parent
BASE = [10.0, 12.0, 11.0, 14.0]
ARM = [11.0, 14.0, 11.5, 16.0]  # differences 1, 2, 0.5, 2: mean 1.375, sd 0.75 (squares sum to 1.6875 over 3)


def observations(**arms: Sequence[float | None]) -> list[Observation]:
    """Values by arm, seed = position; None leaves that seed out."""
    return [
        Observation(arm, seed, value)
        for arm, values in arms.items()
        for seed, value in enumerate(values)
        if value is not None
    ]


def has(warnings: list[str], *words: str) -> bool:
    return any(all(w in line for w in words) for line in warnings)


def test_paired_t_test_matches_scipy_and_hand_values() -> None:
    report = analyse("acc", observations(base=BASE, arm=ARM), ["base", "arm"], "base")
    (c,) = report.comparisons
    assert (c.arm, c.baseline, c.pairs, c.missing) == ("arm", "base", 4, [])
    assert c.mean_diff == pytest.approx(1.375)
    # by hand: t = mean / (sd / sqrt(n)) = 1.375 / 0.375 = 11/3
    assert c.t == pytest.approx(11 / 3)
    # by hand: with 3 degrees of freedom the t CDF is closed form, p = 1 - (2/pi)(theta + sin(theta)cos(theta))
    theta = math.atan((11 / 3) / math.sqrt(3))
    assert c.p == pytest.approx(1 - 2 / math.pi * (theta + math.sin(theta) * math.cos(theta)))
    direct = stats.ttest_rel(ARM, BASE)
    assert c.t == pytest.approx(direct.statistic) and c.p == pytest.approx(direct.pvalue)
    # by hand: mean ± t(0.975, 3) · sd/sqrt(n), t(0.975, 3) = 3.1824 from a table
    assert stats.t.ppf(0.975, 3) == pytest.approx(3.1824, abs=1e-4)
    half = stats.t.ppf(0.975, 3) * 0.375
    assert c.ci_low == pytest.approx(1.375 - half) and c.ci_high == pytest.approx(1.375 + half)
    assert c.ci_low == pytest.approx(0.18158, abs=1e-4) and c.ci_high == pytest.approx(2.56842, abs=1e-4)
    assert c.effect_size == pytest.approx(1.375 / 0.75)
    assert c.better is True
    # one comparison: Holm changes nothing
    assert c.p is not None and c.p_holm == pytest.approx(c.p) and c.significant is (c.p < 0.05)


def test_arm_summary_t_interval_by_hand() -> None:
    report = analyse("acc", observations(base=[60.1, 61.0, 59.8]), ["base"], "base")
    (s,) = report.arms
    assert (s.arm, s.n, s.values) == ("base", 3, {0: 60.1, 1: 61.0, 2: 59.8})
    assert s.mean == pytest.approx(60.3)
    assert s.std == pytest.approx(math.sqrt(0.39))  # squared deviations .04 + .49 + .25, over n - 1 = 2
    half = 4.302652729911275 * math.sqrt(0.39) / math.sqrt(3)  # t(0.975, 2) = 4.3027
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)
    assert s.ci_low == pytest.approx(60.3 - half) and s.ci_high == pytest.approx(60.3 + half)
    assert report.comparisons == [] and report.warnings == []


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04: 3·0.01 = 0.03, 2·0.03 = 0.06, 1·0.04 = 0.04 raised to the running max 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert list(multipletests([0.01, 0.04, 0.03], method="holm")[1]) == pytest.approx([0.03, 0.06, 0.06])
    # an undefined p still counts in the family, as 1: 3·0.01, 2·0.03
    adjusted = holm([0.01, None, 0.03])
    assert adjusted[1] is None and adjusted[0] == pytest.approx(0.03) and adjusted[2] == pytest.approx(0.06)
    assert holm([None, None]) == [None, None] and holm([]) == []


def test_holm_across_arms_in_analyse() -> None:
    data = observations(
        base=[60.1, 61.0, 59.8, 60.5],
        strong=[61.5, 62.1, 61.0, 61.8],
        weak=[60.4, 61.6, 59.7, 60.9],
        none=[60.0, 61.2, 59.9, 60.3],
    )
    report = analyse("acc", data, ["base", "strong", "weak", "none"], "base", alpha=0.05)
    raw = [c.p for c in report.comparisons]
    assert all(p is not None for p in raw)
    expected = multipletests(raw, method="holm")[1]
    assert [c.p_holm for c in report.comparisons] == pytest.approx(list(expected))
    assert [c.arm for c in report.comparisons] == ["strong", "weak", "none"]
    for c in report.comparisons:
        assert c.significant is (c.p_holm is not None and c.p_holm < 0.05)
        assert c.verdict == ("better" if c.significant else "not significant")
    strong = report.comparisons[0]
    assert strong.p is not None and strong.significant and strong.p_holm == pytest.approx(3 * strong.p)


def test_missing_pairs_are_left_out_and_listed() -> None:
    data = observations(base=[1.0, 2.0, 3.0, None], arm=[None, 2.5, 3.0, 9.0])
    report = analyse("acc", data, ["base", "arm"], "base")
    (c,) = report.comparisons
    assert c.pairs == 2 and c.missing == [0, 3]
    assert c.mean_diff == pytest.approx(0.25)  # seeds 1 and 2 only: 0.5 and 0
    assert c.t == pytest.approx(stats.ttest_rel([2.5, 3.0], [2.0, 3.0]).statistic)
    assert has(report.warnings, "seeds [3] only in 'arm'", "seeds [0] only in 'base'")
    assert has(report.warnings, "2 pairs are too few for a bootstrap")
    assert c.boot_low is None and c.boot_high is None


def test_fewer_than_three_values_warn_and_small_arms_do_not_raise() -> None:
    data = observations(base=[1.0, 2.0, 3.0], two=[1.5, 2.1], one=[4.0])
    report = analyse("acc", data, ["base", "two", "one", "empty"], "base")
    two, one, empty = report.arms[1:]
    assert two.n == 2 and two.ci_low is not None
    assert has(report.warnings, "'two' has only 2 values")
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 4.0, None, None, None)
    assert has(report.warnings, "'one' has 1 value")
    assert (empty.n, empty.mean, empty.std, empty.values) == (0, None, None, {})
    assert has(report.warnings, "'empty' has no values")
    c_one, c_empty = report.comparisons[1:]
    assert c_one.pairs == 1 and c_one.mean_diff == pytest.approx(3.0) and c_one.p is None and c_one.t is None
    assert c_one.verdict == "undetermined" and not c_one.significant
    assert c_empty.pairs == 0 and c_empty.mean_diff is None and c_empty.better is None
    assert c_empty.missing == [0, 1, 2]


def test_zero_variance_differences_give_no_p() -> None:
    # 61.2 - 60.1, 62.1 - 61.0, 60.7 - 59.6 are all 1.1, but differ in the last bits after subtraction
    data = observations(base=[60.1, 61.0, 59.6], arm=[61.2, 62.1, 60.7])
    report = analyse("acc", data, ["base", "arm"], "base")
    (c,) = report.comparisons
    assert c.pairs == 3 and c.mean_diff == pytest.approx(1.1)
    assert (c.t, c.p, c.p_holm, c.ci_low, c.ci_high, c.boot_low, c.effect_size) == (None,) * 7
    assert c.better is True and c.significant is False and c.verdict == "undetermined"
    assert has(report.warnings, "all 3 paired differences equal 1.1", "p is none")


def test_zero_variance_arm() -> None:
    report = analyse("acc", observations(base=[5.0, 5.0, 5.0]), ["base"], "base")
    (s,) = report.arms
    assert (s.mean, s.std, s.ci_low, s.ci_high) == (5.0, 0.0, None, None)
    assert has(report.warnings, "all 3 values equal 5")


def test_non_finite_values_are_dropped_with_a_warning() -> None:
    data = observations(base=[1.0, 2.0, 3.0, 4.0], arm=[1.5, math.nan, 3.5, math.inf])
    report = analyse("acc", data, ["base", "arm"], "base")
    arm = report.arms[1]
    assert arm.n == 2 and arm.values == {0: 1.5, 2: 3.5}
    assert has(report.warnings, "seed 1", "nan", "dropped") and has(report.warnings, "seed 3", "inf", "dropped")
    assert report.comparisons[0].pairs == 2 and report.comparisons[0].missing == [1, 3]


def test_direction_min_flips_better() -> None:
    up = analyse("loss", observations(base=BASE, arm=ARM), ["base", "arm"], "base", direction="max")
    down = analyse("loss", observations(base=BASE, arm=ARM), ["base", "arm"], "base", direction="min")
    assert up.comparisons[0].better is True and down.comparisons[0].better is False
    assert up.comparisons[0].mean_diff == down.comparisons[0].mean_diff  # always arm - baseline
    assert up.comparisons[0].verdict == "better" and down.comparisons[0].verdict == "worse"


def test_baseline_without_values() -> None:
    report = analyse("acc", observations(arm=[1.0, 2.0, 3.0]), ["base", "arm"], "base")
    (c,) = report.comparisons
    assert c.pairs == 0 and c.missing == [0, 1, 2] and c.p is None and c.better is None
    assert has(report.warnings, "baseline 'base' has no values")


def test_bootstrap_is_seeded_and_matches_scipy() -> None:
    first = analyse("acc", observations(base=BASE, arm=ARM), ["base", "arm"], "base", seed=7).comparisons[0]
    again = analyse("acc", observations(base=BASE, arm=ARM), ["base", "arm"], "base", seed=7).comparisons[0]
    assert (first.boot_low, first.boot_high) == (again.boot_low, again.boot_high)
    diffs = np.array(ARM) - np.array(BASE)
    direct = stats.bootstrap(
        (diffs,), np.mean, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, rng=np.random.default_rng(7)
    )
    assert first.boot_low == pytest.approx(direct.confidence_interval.low)
    assert first.boot_high == pytest.approx(direct.confidence_interval.high)
    assert first.boot_low is not None and first.boot_high is not None
    assert 0.5 <= first.boot_low <= 1.375 <= first.boot_high <= 2.0


def test_strays_duplicates_and_bad_arguments() -> None:
    data = [*observations(base=[1.0, 2.0, 3.0]), Observation("base", 2, 4.0), Observation("ghost", 0, 1.0)]
    report = analyse("acc", data, ["base"], "base")
    assert report.arms[0].values == {0: 1.0, 1: 2.0, 2: 4.0}
    assert has(report.warnings, "seed 2", "last one") and has(report.warnings, "'ghost' (1)")
    with pytest.raises(ValueError, match="baseline"):
        analyse("acc", data, ["a"], "base")
    with pytest.raises(ValueError, match="distinct"):
        analyse("acc", data, ["base", "base"], "base")
    with pytest.raises(ValueError, match="alpha"):
        analyse("acc", data, ["base"], "base", alpha=1.5)


def test_modules_import_without_heavy_dependencies() -> None:
    code = (
        "import sys, orchestrator.sweeps.stats, orchestrator.sweeps.report, orchestrator.sweeps.plots\n"
        "heavy = {'torch', 'scipy', 'statsmodels', 'matplotlib'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
