"""Comparisons against the control (issue 10): every interval and p-value against an
independent computation (the published boundary, a numerical integral, textbook examples,
order statistics of the raw rows), the false-positive rate under daily peeking by
simulation, direction-aware verdicts, and the report and export built on them."""

from __future__ import annotations

import io
import json
import math
import uuid
from collections import defaultdict
from datetime import UTC, datetime

import numpy as np
import pytest
from django.core.management import call_command
from scipy import integrate, optimize
from statsmodels.stats.multitest import multipletests

from experiments import services, significance
from experiments.models import LatencyMetric
from experiments.reports.figures import CheckpointStats, SlotStats
from experiments.reports.histogram import RELATIVE_ACCURACY, key_of
from experiments.reports.report import experiment_report
from experiments.reports.statistics import METRICS, Verdict, compare_to_control
from tests.comparison_seed import seed_comparison

ALPHA = significance.ALPHA
RHO = significance.RHO


# --- independent computations ---------------------------------------------------------------


def howard_halfwidth(variance: float, n: int, alpha: float, rho: float) -> float:
    """The two-sided normal-mixture boundary as Howard, Ramdas, McAuliffe & Sekhon (2021)
    publish it for a sum S_n with intrinsic time V_n = n·σ² and mixture precision m:
    |S_n| < sqrt((V_n + m) · log((V_n + m) / (m α²))), here with m = σ²/ρ², divided by n."""
    intrinsic = n * variance
    precision = variance / rho**2
    return (
        math.sqrt(
            (intrinsic + precision) * math.log((intrinsic + precision) / (precision * alpha**2))
        )
        / n
    )


def log_mixture_likelihood_ratio(estimate: float, variance: float, n: int, rho: float) -> float:
    """log ∫ exp(λ S_n − λ² V_n / 2) dN(λ; 0, ρ²/σ²), by numerical integration (around the
    integrand's peak, in logs so that overwhelming evidence does not overflow)."""
    sum_, intrinsic, spread = n * estimate, n * variance, rho / math.sqrt(variance)

    def log_integrand(lam: float) -> float:
        log_density = -0.5 * (lam / spread) ** 2 - math.log(spread * math.sqrt(2 * math.pi))
        return lam * sum_ - lam * lam * intrinsic / 2 + log_density

    precision = intrinsic + 1 / spread**2
    peak, width = sum_ / precision, 12 / math.sqrt(precision)
    top = log_integrand(peak)
    value, _ = integrate.quad(
        lambda lam: math.exp(log_integrand(lam) - top),
        peak - width,
        peak + width,
        epsabs=0,
        epsrel=1e-11,
    )
    return top + math.log(value)


def assert_p_value_is_the_mixtures(p_value: float, estimate, variance, n) -> None:
    """p = min(1, 1/M_n), compared in logs (tiny p-values underflow to 0)."""
    log_ratio = log_mixture_likelihood_ratio(estimate, variance, n, RHO)
    if log_ratio <= 0:
        assert p_value == 1.0
    elif p_value == 0.0:
        assert log_ratio > 700
    else:
        assert -math.log(p_value) == pytest.approx(log_ratio, rel=1e-7, abs=1e-9)


def holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm (1979): adjusted p_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# --- the confidence sequence against the published boundary ------------------------------


@pytest.mark.parametrize(
    ("variance", "n", "alpha"),
    [(1.0, 10, 0.05), (0.09, 1_000, 0.05), (250_000.0, 20_000, 0.0125), (4.0, 10**6, 0.001)],
)
def test_halfwidth_is_howard_et_al_normal_mixture_boundary(variance, n, alpha):
    assert significance.mixture_halfwidth(variance, n, alpha) == pytest.approx(
        howard_halfwidth(variance, n, alpha, RHO), rel=1e-12
    )


@pytest.mark.parametrize(
    ("estimate", "variance", "n"), [(0.01, 0.09, 2_000), (-35.0, 250_000.0, 900), (0.3, 1.0, 50)]
)
def test_p_value_is_one_over_the_mixture_likelihood_ratio(estimate, variance, n):
    p_value = significance.mixture_p_value(estimate, variance, n)
    assert_p_value_is_the_mixtures(p_value, estimate, variance, n)
    if p_value < 1:
        # …and the level at which the interval just touches 0.
        assert significance.mixture_halfwidth(variance, n, p_value) == pytest.approx(
            abs(estimate), rel=1e-9
        )


def test_rho_makes_the_sequence_tightest_near_the_tuning_sample_size():
    n_star = significance.TUNING_SAMPLE_SIZE
    best = optimize.minimize_scalar(
        lambda rho: significance.mixture_halfwidth(1.0, n_star, ALPHA, rho),
        bounds=(1e-4, 1.0),
        method="bounded",
    )
    ours = significance.mixture_halfwidth(1.0, n_star, ALPHA)
    assert ours == pytest.approx(best.fun, rel=5e-3)
    # Always wider than the fixed-n interval: the price of looking every day.
    assert ours > 1.959964 / math.sqrt(n_star)


def test_two_sample_differences_scale_the_estimates_variance_to_one_unit():
    difference = significance.proportion_difference(30, 1000, 12, 600)
    p_a, p_b = 30 / 1000, 12 / 600
    assert difference.estimate == pytest.approx(p_b - p_a)
    assert difference.units == 1600
    assert difference.variance == pytest.approx(
        1600 * (p_a * (1 - p_a) / 1000 + p_b * (1 - p_b) / 600)
    )
    interval = difference.at(0.05)
    half = howard_halfwidth(difference.variance, 1600, 0.05, RHO)
    assert (interval.low, interval.high) == pytest.approx((p_b - p_a - half, p_b - p_a + half))
    means = significance.mean_difference(1200.0, 90_000.0, 500, 1100.0, 40_000.0, 700)
    assert means.estimate == pytest.approx(-100.0)
    assert means.variance == pytest.approx(1200 * (90_000 / 500 + 40_000 / 700))
    assert significance.mean_difference(1.0, 1.0, 1, 1.0, 1.0, 10) is None


# --- library replacements against textbook values --------------------------------------------


def test_srm_chi_square_matches_mendels_peas():
    # Mendel's dihybrid cross: 315 round-yellow, 108 round-green, 101 wrinkled-yellow and
    # 32 wrinkled-green against 9:3:3:1 (chi-square ≈ 0.470, p ≈ 0.925).
    observed, weights = [315, 108, 101, 32], [9, 3, 3, 1]
    expected = [556 * w / 16 for w in weights]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    # Three degrees of freedom: P(X ≥ x) = erfc(sqrt(x/2)) + sqrt(2x/π) e^(−x/2).
    p_value = math.erfc(math.sqrt(statistic / 2)) + math.sqrt(2 * statistic / math.pi) * math.exp(
        -statistic / 2
    )
    assert significance.chi_square_goodness_of_fit(observed, weights) == pytest.approx(
        (statistic, 3, p_value), rel=1e-9
    )
    assert round(statistic, 3) == 0.470 and round(p_value, 3) == 0.925


@pytest.mark.parametrize(
    ("successes", "trials", "published"),
    # Newcombe (1998), Statistics in Medicine 17:857, table II, method 3 (Wilson score).
    [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611))],
)
def test_wilson_interval_matches_newcombes_published_values(successes, trials, published):
    low, high = significance.wilson_interval(successes, trials)
    assert (round(low, 4), round(high, 4)) == published


def test_holm_matches_the_step_down_procedure_on_a_textbook_example():
    p_values = [0.01, 0.04, 0.03, 0.005]
    result = significance.holm(p_values)
    assert result.adjusted_p_values == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert result.adjusted_p_values == pytest.approx(holm_by_hand(p_values))
    reference_rejected, reference_adjusted, _, _ = multipletests(p_values, method="holm")
    assert result.adjusted_p_values == pytest.approx(list(reference_adjusted))
    assert result.rejected == list(reference_rejected)
    assert result.rejected == [True, False, False, True]
    # 0.005 at α/4, 0.01 at α/3; Holm stops at 0.03 (> α/2), so the rest are drawn at α/2.
    assert result.levels == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])


def test_holm_levels_make_intervals_agree_with_the_verdicts():
    rng = np.random.default_rng(5)
    for _ in range(200):
        differences = [
            significance.TwoSampleDifference(float(rng.normal(0, 0.02)), 0.09, int(n))
            for n in rng.integers(200, 20_000, size=int(rng.integers(1, 9)))
        ]
        p_values = [d.at(ALPHA).p_value for d in differences]
        result = significance.holm(p_values)
        reference_rejected, reference_adjusted, _, _ = multipletests(p_values, method="holm")
        assert result.adjusted_p_values == pytest.approx(list(reference_adjusted))
        assert result.rejected == list(reference_rejected)
        for difference, rejected, level in zip(
            differences, result.rejected, result.levels, strict=True
        ):
            assert difference.at(level).excludes_zero == rejected


# --- percentiles ----------------------------------------------------------------------------


def exact_bounds(values: np.ndarray, quantile: float, alpha: float) -> tuple[float, float]:
    """Order statistics at the ranks the published proportion boundary gives, from the raw
    values: X(⌈n(q − w)⌉) and X(⌊n(q + w)⌋ + 1), w from Howard et al.'s form."""
    n = len(values)
    ordered = np.sort(values)
    half = howard_halfwidth(quantile * (1 - quantile), n, alpha, RHO)
    low_rank, high_rank = math.ceil(n * (quantile - half)), math.floor(n * (quantile + half)) + 1
    low = ordered[low_rank - 1] if low_rank >= 1 else 0.0
    high = ordered[high_rank - 1] if high_rank <= n else math.inf
    return float(low), float(high)


def histogram_of(values) -> significance.Histogram:
    counts: dict[int, int] = defaultdict(int)
    for value in values:
        counts[key_of(float(value))] += 1
    from experiments.reports.histogram import value_of

    return significance.Histogram(
        tuple((value_of(key), count) for key, count in sorted(counts.items())), RELATIVE_ACCURACY
    )


@pytest.mark.parametrize(("quantile", "n"), [(0.5, 40), (0.5, 3_000), (0.95, 3_000), (0.95, 60)])
def test_quantile_bounds_are_the_order_statistics_within_the_histograms_accuracy(quantile, n):
    values = np.random.default_rng(n).lognormal(7, 0.6, size=n).round()
    low, high = exact_bounds(values, quantile, 0.025)
    exact = significance.Histogram(tuple((float(v), 1) for v in np.sort(values)))
    assert exact.quantile_bounds(quantile, 0.025) == (low, high)
    binned_low, binned_high = histogram_of(values).quantile_bounds(quantile, 0.025)
    accuracy = RELATIVE_ACCURACY
    assert low * (1 - accuracy) / (1 + accuracy) - 1e-9 <= binned_low <= low + 1e-9
    if math.isinf(high):
        assert math.isinf(binned_high)
    else:
        assert high - 1e-9 <= binned_high <= high * (1 + accuracy) / (1 - accuracy) + 1e-9


def test_quantile_difference_p_value_is_where_the_interval_reaches_zero():
    rng = np.random.default_rng(3)
    control = histogram_of(rng.lognormal(7.0, 0.5, size=2_000))
    candidate = histogram_of(rng.lognormal(7.1, 0.5, size=2_000))
    difference = significance.QuantileDifference(control, candidate, 0.5, 0.0)
    p_value = difference.p_value()
    assert 0 < p_value < 1
    assert difference.at(p_value * 1.002).excludes_zero
    assert not difference.at(p_value / 1.01).excludes_zero


# --- simulation: A/A experiments with daily peeking ------------------------------------------

EXPERIMENTS, DAYS = 2_000, 30


def ever_excludes_zero(estimates, variances, units) -> np.ndarray:
    """Per experiment: does any day's always-valid interval exclude 0? (vectorised)"""
    n_rho2 = units * RHO**2
    half = np.sqrt(variances) * np.sqrt(
        2 * (n_rho2 + 1) / (units**2 * RHO**2) * np.log(np.sqrt(n_rho2 + 1) / ALPHA)
    )
    return (np.abs(estimates) > half).any(axis=1)


def test_aa_error_rates_peeked_daily_keep_the_false_positive_rate():
    rng = np.random.default_rng(20261129)
    per_day = 200
    errors = rng.binomial(per_day, 0.08, size=(2, EXPERIMENTS, DAYS)).cumsum(axis=2)
    n = per_day * np.arange(1, DAYS + 1)
    p_a, p_b = errors[0] / n, errors[1] / n
    units = 2 * n
    variances = units * (p_a * (1 - p_a) / n + p_b * (1 - p_b) / n)
    sequential = ever_excludes_zero(p_b - p_a, variances, units).mean()
    # The same peeking with a fixed-n 95% interval each day: the inflation the sequence avoids.
    naive = (np.abs(p_b - p_a) > 1.959964 * np.sqrt(variances / units)).any(axis=1).mean()
    assert sequential <= 0.05
    assert naive > 0.10


def test_aa_mean_latencies_peeked_daily_keep_the_false_positive_rate():
    rng = np.random.default_rng(7)
    per_day = 100
    # Skewed like latencies: lognormal, 100 requests a day per checkpoint.
    samples = rng.lognormal(7, 0.8, size=(2, EXPERIMENTS, DAYS, per_day))
    sums = samples.sum(axis=3).cumsum(axis=2)
    squares = (samples**2).sum(axis=3).cumsum(axis=2)
    n = per_day * np.arange(1, DAYS + 1)
    means = sums / n
    variances_each = (squares - n * means**2) / (n - 1)
    units = 2 * n
    variances = units * (variances_each[0] / n + variances_each[1] / n)
    sequential = ever_excludes_zero(means[1] - means[0], variances, units).mean()
    naive = (np.abs(means[1] - means[0]) > 1.959964 * np.sqrt(variances / units)).any(axis=1).mean()
    assert sequential <= 0.05
    assert naive > 0.10


def test_aa_median_latencies_peeked_daily_keep_the_false_positive_rate():
    rng = np.random.default_rng(99)
    per_day, experiments = 40, EXPERIMENTS
    samples = rng.lognormal(7, 0.8, size=(2, experiments, DAYS * per_day))
    false_positive = np.zeros(experiments, dtype=bool)
    for day in range(1, DAYS + 1):
        n = day * per_day
        ordered = np.sort(samples[:, :, :n], axis=2)
        half = significance.mixture_halfwidth(0.25, n, ALPHA / 2)
        low_rank, high_rank = math.ceil(n * (0.5 - half)), math.floor(n * (0.5 + half)) + 1
        if low_rank < 1 or high_rank > n:
            continue  # an open side: no interval can exclude 0 yet
        low, high = ordered[:, :, low_rank - 1], ordered[:, :, high_rank - 1]
        false_positive |= (low[1] - high[0] > 0) | (high[1] - low[0] < 0)
    assert false_positive.mean() <= 0.05


# --- direction-aware verdicts from figures --------------------------------------------------


def checkpoint(label: str, **figures) -> CheckpointStats:
    stats = CheckpointStats(
        version_id=uuid.uuid4(),
        slot_id=uuid.uuid4(),
        slot_label=label,
        internal_id=f"rc-{label}",
        effective_from=datetime(2026, 11, 1, tzinfo=UTC),
        effective_until=None,
    )
    for name, value in figures.items():
        setattr(stats, name, value)
    return stats


def slots_of(*checkpoints: CheckpointStats, control: int = 0) -> list[SlotStats]:
    return [
        SlotStats(
            c.slot_id,
            c.slot_label,
            1,
            1 / len(checkpoints),
            checkpoints=[c],
            is_control=i == control,
        )
        for i, c in enumerate(checkpoints)
    ]


def figures(errors: int, requests: int = 10_000, mean: float = 1000.0) -> dict:
    return {
        "requests": requests,
        "errors": errors,
        "total_samples": requests,
        "total_mean": mean,
        "total_variance": 250_000.0,
    }


def test_verdicts_know_which_way_is_better():
    control = checkpoint("control", **figures(800, mean=1000.0))
    better = checkpoint("better", **figures(400, mean=800.0))
    worse = checkpoint("worse", **figures(1200, mean=1200.0))
    same = checkpoint("same", **figures(805, mean=1001.0))
    slots = slots_of(control, better, worse, same)
    result = compare_to_control(slots, current={s.slot_id: s.checkpoints[0] for s in slots})
    verdicts = {
        (r.candidate.slot_label, r.metric.key): r.verdict
        for r in result.rows
        if r.interval is not None
    }
    assert verdicts == {
        ("better", "error_rate"): Verdict.BETTER,
        ("better", "total_latency_mean"): Verdict.BETTER,
        ("worse", "error_rate"): Verdict.WORSE,
        ("worse", "total_latency_mean"): Verdict.WORSE,
        ("same", "error_rate"): Verdict.INCONCLUSIVE,
        ("same", "total_latency_mean"): Verdict.INCONCLUSIVE,
    }
    # Percentiles without histograms: shown, without an interval or a verdict.
    untested = [r for r in result.rows if r.interval is None]
    assert {r.metric.key for r in untested} == {
        "total_latency_p50",
        "total_latency_p95",
        "throughput_p50",
    }
    assert all(r.note == "not enough data" and r.verdict == Verdict.INCONCLUSIVE for r in untested)


def test_higher_throughput_is_better():
    rng = np.random.default_rng(1)
    control = checkpoint("control", **figures(10))
    faster = checkpoint("faster", **figures(10))
    for stats, scale in ((control, 100.0), (faster, 150.0)):
        values = rng.normal(scale, 10, size=3_000)
        counts: dict[int, int] = defaultdict(int)
        for value in values:
            counts[key_of(float(value))] += 1
        stats.histograms[int(LatencyMetric.THROUGHPUT)] = sorted(counts.items())
        stats.throughput_p50 = float(np.median(values))
    slots = slots_of(control, faster)
    result = compare_to_control(slots, current={s.slot_id: s.checkpoints[0] for s in slots})
    row = next(r for r in result.rows if r.metric.key == "throughput_p50")
    assert row.estimate > 0 and row.verdict == Verdict.BETTER and not row.metric.lower_is_better


def test_feedback_share_is_one_more_metric_once_there_is_feedback():
    control = checkpoint("control", **figures(10))
    candidate = checkpoint("candidate", **figures(10))
    slots = slots_of(control, candidate)
    current = {s.slot_id: s.checkpoints[0] for s in slots}
    keys = {r.metric.key for r in compare_to_control(slots, current=current).rows}
    assert "feedback_share_up" not in keys  # no feedback figures at all
    control.feedback_up, control.feedback_down = 300, 200
    candidate.feedback_up, candidate.feedback_down = 450, 50
    rows = compare_to_control(slots, current=current).rows
    row = next(r for r in rows if r.metric.key == "feedback_share_up")
    assert (row.control_value, row.candidate_value) == pytest.approx((0.6, 0.9))
    assert row.verdict == Verdict.BETTER and not row.metric.lower_is_better
    expected = significance.proportion_difference(300, 500, 450, 500)
    assert row.estimate == pytest.approx(expected.estimate)
    assert_p_value_is_the_mixtures(row.p_value, expected.estimate, expected.variance, 1000)
    assert [m.key for m in METRICS][-1] == "feedback_share_up"


# --- the report, from rollups, against the raw rows ------------------------------------------


@pytest.fixture
def comparison(db):
    return seed_comparison()


def raw_by_slot(seeded):
    grouped = defaultdict(list)
    for row in seeded.requests:
        grouped[row.slot_label].append(row)
    return grouped


def test_report_compares_the_control_with_each_other_slot_from_the_raw_rows(comparison):
    report = experiment_report(comparison.experiment)
    result = report.comparisons
    assert result.control_slot_label == "control"
    assert result.control.version_id == comparison.versions["control"].pk
    raw = raw_by_slot(comparison)
    rows = result.rows
    assert {r.candidate.slot_label for r in rows} == {"faster", "slower"}
    assert {r.metric.key for r in rows} == {m.key for m in METRICS} - {"feedback_share_up"}
    # Every p-value from the raw rows by the published formulas, Holm by hand.
    for row in rows:
        cand, ctrl = raw[row.candidate.slot_label], raw["control"]
        if row.metric.key == "error_rate":
            x_a, n_a = sum(r.has_error for r in ctrl), len(ctrl)
            x_b, n_b = sum(r.has_error for r in cand), len(cand)
            p_a, p_b = x_a / n_a, x_b / n_b
            variance = (n_a + n_b) * (p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
            estimate, units = p_b - p_a, n_a + n_b
        elif row.metric.key == "total_latency_mean":
            a = np.array([r.total_ms for r in ctrl], dtype=float)
            b = np.array([r.total_ms for r in cand], dtype=float)
            units = len(a) + len(b)
            variance = units * (a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
            estimate = b.mean() - a.mean()
        else:
            continue
        assert row.estimate == pytest.approx(estimate, rel=1e-9)
        assert_p_value_is_the_mixtures(row.p_value, estimate, variance, units)
        half = howard_halfwidth(variance, units, row.level, RHO)
        assert row.ci == pytest.approx((estimate - half, estimate + half), rel=1e-9)
    adjusted = holm_by_hand([r.p_value for r in rows])
    assert [r.adjusted_p_value for r in rows] == pytest.approx(adjusted)
    for row in rows:
        assert row.interval.excludes_zero == (row.verdict != Verdict.INCONCLUSIVE)
        assert (row.adjusted_p_value <= ALPHA) == (row.verdict != Verdict.INCONCLUSIVE)
    verdicts = {(r.candidate.slot_label, r.metric.key): r.verdict for r in rows}
    assert verdicts[("faster", "error_rate")] == Verdict.BETTER
    assert verdicts[("faster", "total_latency_p50")] == Verdict.BETTER
    assert verdicts[("faster", "throughput_p50")] == Verdict.BETTER
    assert verdicts[("slower", "total_latency_p95")] == Verdict.WORSE
    assert verdicts[("slower", "error_rate")] == Verdict.INCONCLUSIVE


def test_report_percentile_intervals_bracket_the_raw_order_statistics(comparison):
    rows = experiment_report(comparison.experiment).comparisons.rows
    raw = raw_by_slot(comparison)
    accuracy = RELATIVE_ACCURACY
    for row in rows:
        if row.metric.key not in ("total_latency_p50", "total_latency_p95"):
            continue
        quantile = 0.5 if row.metric.key.endswith("p50") else 0.95
        ctrl = np.array([r.total_ms for r in raw["control"]], dtype=float)
        cand = np.array([r.total_ms for r in raw[row.candidate.slot_label]], dtype=float)
        ctrl_low, ctrl_high = exact_bounds(ctrl, quantile, row.level / 2)
        cand_low, cand_high = exact_bounds(cand, quantile, row.level / 2)
        # The histogram widens each bound outward by at most its relative accuracy, twice.
        widen = (1 + accuracy) / (1 - accuracy)
        assert (
            cand_low / widen - ctrl_high * widen - 1e-6 <= row.ci[0] <= cand_low - ctrl_high + 1e-6
        )
        assert (
            cand_high - ctrl_low - 1e-6 <= row.ci[1] <= cand_high * widen - ctrl_low / widen + 1e-6
        )


def test_choosing_another_control_and_every_checkpoint(comparison):
    services.set_control(variant=comparison.versions["faster"].variant)
    result = experiment_report(comparison.experiment).comparisons
    assert result.control_slot_label == "faster"
    assert {r.candidate.slot_label for r in result.rows} == {"control", "slower"}
    error = next(
        r
        for r in result.rows
        if r.candidate.slot_label == "control" and r.metric.key == "error_rate"
    )
    assert error.estimate > 0 and error.verdict == Verdict.WORSE
    every = experiment_report(comparison.experiment, all_checkpoints=True).comparisons
    assert every.all_checkpoints
    assert {r.candidate.slot_label for r in every.rows} == {"control", "slower"}


def test_all_checkpoints_adds_the_earlier_checkpoints_of_every_slot(db):
    from tests.report_seed import seed_experiment

    seeded = seed_experiment()
    current = experiment_report(seeded.experiment).comparisons
    # slot-a was created first: its current checkpoint a2 is the control.
    assert current.control.version_id == seeded.versions["a2"].pk
    assert {r.candidate.version_id for r in current.rows} == {seeded.versions["b1"].pk}
    every = experiment_report(seeded.experiment, all_checkpoints=True).comparisons
    assert {r.candidate.version_id for r in every.rows} == {
        seeded.versions["b1"].pk,
        seeded.versions["a1"].pk,
    }
    # Holm runs over every comparison shown: more comparisons, stricter levels.
    assert min(r.level for r in every.rows if r.level) <= min(
        r.level for r in current.rows if r.level
    )


def test_no_comparisons_when_the_control_has_no_requests(db):
    from tests.factories import make_experiment

    experiment = make_experiment(status="active")
    result = experiment_report(experiment).comparisons
    assert result.rows == [] and "has no requests" in result.reason


# --- experiment_report ----------------------------------------------------------------------


def run_report(*args: str) -> str:
    out = io.StringIO()
    call_command("experiment_report", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_json_export_names_the_control_and_every_comparison(comparison):
    exported = json.loads(run_report(str(comparison.experiment.pk), "--format", "json"))
    report = experiment_report(comparison.experiment)
    control = comparison.versions["control"]
    assert exported["control"] == {
        "slot": "control",
        "version_id": str(control.pk),
        "internal_id": "rc-control",
        "label": "control v1",
    }
    assert exported["comparison_method"]["correction"] == "holm"
    assert "Howard, Ramdas, McAuliffe & Sekhon" in exported["comparison_method"]["name"]
    assert len(exported["comparisons"]) == len(report.comparisons.rows) == 10
    for item, row in zip(exported["comparisons"], report.comparisons.rows, strict=True):
        assert set(item) >= {
            "metric",
            "control_version_id",
            "candidate_version_id",
            "estimate",
            "ci",
            "p_value",
            "adjusted_p_value",
            "verdict",
            "lower_is_better",
            "method",
        }
        assert item["metric"] == row.metric.key
        assert item["control_version_id"] == str(control.pk)
        assert item["candidate_version_id"] == str(row.candidate.version_id)
        assert item["estimate"] == pytest.approx(row.estimate)
        assert item["ci"] == pytest.approx(list(row.ci))
        assert item["p_value"] == pytest.approx(row.p_value)
        assert item["adjusted_p_value"] == pytest.approx(row.adjusted_p_value)
        assert item["verdict"] == row.verdict
        assert item["lower_is_better"] == row.metric.lower_is_better
    every = json.loads(
        run_report(str(comparison.experiment.pk), "--format", "json", "--all-checkpoints")
    )
    assert every["comparison_method"]["all_checkpoints"] is True


def test_table_export_lists_verdicts_against_the_control(comparison):
    text = run_report(str(comparison.experiment.pk))
    assert "Comparisons against the control control/rc-control (candidate − control):" in text
    assert "faster/rc-faster  Error rate:" in text
    assert "-> BETTER (lower is better)" in text
    assert "-> WORSE" in text and "-> INCONCLUSIVE" in text
    assert "Howard, Ramdas, McAuliffe & Sekhon" in text
