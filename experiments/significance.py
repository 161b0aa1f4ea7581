"""The statistics behind the reports: library distributions, and always-valid intervals.

- The sample-ratio check is scipy's chi-square goodness of fit (``scipy.stats.chisquare``);
  a share's 95% interval is statsmodels' Wilson interval (``proportion_confint``). Both
  replaced hand-written numerics (an incomplete-gamma continued fraction, a Wilson formula)
  that did the same thing with more code to trust.
- Comparisons use **always-valid confidence sequences**: intervals that keep their coverage
  however often they are looked at (staff open the Stats page every day), so stopping when
  an interval first excludes 0 does not inflate the false-positive rate as repeated fixed-n
  intervals do. The method is the normal-mixture (mixture SPRT) confidence sequence of
  Howard, Ramdas, McAuliffe & Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic
  confidence sequences", Ann. Statist. 49(2), in its asymptotic form (Waudby-Smith,
  Arbour, Sinha, Kennedy & Ramdas, "Time-uniform central limit theory and asymptotic
  confidence sequences", Ann. Statist. 2024, Thm 2.2), as GrowthBook's sequential testing
  applies it: for an estimate from N units with per-unit variance s²,

      estimate ± s · sqrt( 2(Nρ² + 1) / (N²ρ²) · ln( sqrt(Nρ² + 1) / α ) ),

  with ρ tuned to be tightest at N* units (``mixture_rho``). The always-valid p-value is
  the smallest α whose interval excludes 0 (``mixture_p_value``, closed form).
  No package on the project's machines implements this (gbstats does, with pandas and
  pydantic in tow), so the two formulas are written here and checked in the tests against
  the boundary as Howard et al. publish it.
- Percentiles (latency p50/p95, throughput p50) get a confidence sequence for a quantile
  per checkpoint: the share of values at or below the true quantile q is a proportion with
  known variance q(1−q), so the mixture sequence for it gives ranks, and ranks give values
  from the mergeable histograms (each within their relative accuracy). Two checkpoints'
  sequences at α/2 each bound the difference (``quantile_difference_interval``).
- Multiple comparisons: Holm's step-down procedure over the always-valid p-values of the
  comparisons shown (``holm``; checked against statsmodels' ``multipletests``, which is
  not called at request time because it runs a full garbage collection on every call).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

# numpy, scipy and statsmodels are imported where they are used: every process that
# loads the admin (the gateway's too) imports this module, and statsmodels brings pandas
# (~100 MB of resident memory) that only a report page needs.

#: The family-wise error rate of the comparisons on one page.
ALPHA = 0.05
#: N*: the number of requests (both checkpoints together) where the sequence is tightest.
#: The interval is valid at every N whatever this is; it trades width early for width late.
#: (GrowthBook's default is 5,000 units; a day of preview traffic is typically more.)
TUNING_SAMPLE_SIZE = 10_000


# --- fixed-sample helpers (scipy / statsmodels) -----------------------------------------


def chi_square_goodness_of_fit(
    observed: Sequence[int], weights: Sequence[float]
) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of observed counts against weights."""
    if len(observed) != len(weights) or len(observed) < 2:
        raise ValueError("need at least two categories with one weight each")
    total = sum(observed)
    weight_sum = float(sum(weights))
    expected = [total * weight / weight_sum for weight in weights]
    import numpy as np
    from scipy import stats

    result = stats.chisquare(np.asarray(observed, dtype=float), np.asarray(expected))
    return float(result.statistic), len(observed) - 1, float(result.pvalue)


def wilson_interval(successes: int, trials: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval for a proportion (e.g. the share of positive feedback)."""
    if trials <= 0:
        raise ValueError("trials must be positive")
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, trials, alpha=alpha, method="wilson")
    return float(low), float(high)


# --- the normal-mixture confidence sequence ---------------------------------------------


def mixture_rho(alpha: float = ALPHA, tuning_sample_size: float = TUNING_SAMPLE_SIZE) -> float:
    """The mixture's ρ that makes the sequence about tightest at ``tuning_sample_size``
    units (Howard et al. 2021, eq. (3.8) with the Lambert-W approximation, as gbstats'
    ``sequential_rho``). It must not depend on the data."""
    log_alpha = -2 * math.log(alpha)
    return math.sqrt((log_alpha + math.log(log_alpha + 1)) / tuning_sample_size)


#: ρ for the page's α: fixed, so every look uses the same sequence.
RHO = mixture_rho()


def mixture_halfwidth(variance: float, units: float, alpha: float, rho: float = RHO) -> float:
    """Half-width of the always-valid interval for a mean of ``units`` units with per-unit
    ``variance``, at level ``alpha``."""
    n_rho2 = units * rho * rho
    return math.sqrt(variance) * math.sqrt(
        2 * (n_rho2 + 1) / (units * units * rho * rho) * math.log(math.sqrt(n_rho2 + 1) / alpha)
    )


def mixture_p_value(estimate: float, variance: float, units: float, rho: float = RHO) -> float:
    """The always-valid p-value: the smallest α whose interval excludes 0 (the interval
    at α excludes 0 exactly when this is below α). 1/p is the mixture likelihood ratio."""
    if variance <= 0:
        return 1.0 if estimate == 0 else 0.0
    n_rho2 = units * rho * rho
    exponent = -(units * units * rho * rho * estimate * estimate) / (2 * variance * (n_rho2 + 1))
    return min(1.0, math.sqrt(n_rho2 + 1) * math.exp(exponent))


@dataclass(frozen=True)
class SequentialEstimate:
    """candidate − control, its always-valid interval at ``alpha`` and its p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    alpha: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class TwoSampleDifference:
    """A difference of two means from independent samples, as the mixture sequence sees it:
    N = n_a + n_b units, per-unit variance N · (s²_a/n_a + s²_b/n_b) (the variance of the
    estimate, scaled back to one unit)."""

    estimate: float
    variance: float
    units: int

    def at(self, alpha: float) -> SequentialEstimate:
        half = mixture_halfwidth(self.variance, self.units, alpha) if self.variance > 0 else 0.0
        return SequentialEstimate(
            self.estimate,
            self.estimate - half,
            self.estimate + half,
            mixture_p_value(self.estimate, self.variance, self.units),
            alpha,
        )


def mean_difference(
    mean_a: float, variance_a: float, n_a: int, mean_b: float, variance_b: float, n_b: int
) -> TwoSampleDifference | None:
    """``mean_b − mean_a`` (b the candidate, a the control); None below two values each."""
    if n_a < 2 or n_b < 2:
        return None
    units = n_a + n_b
    variance = units * (variance_a / n_a + variance_b / n_b)
    return TwoSampleDifference(mean_b - mean_a, variance, units)


def proportion_difference(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int
) -> TwoSampleDifference | None:
    """``p_b − p_a`` (b the candidate, a the control), each with variance p(1−p)."""
    if trials_a < 1 or trials_b < 1:
        return None
    p_a, p_b = successes_a / trials_a, successes_b / trials_b
    units = trials_a + trials_b
    variance = units * (p_a * (1 - p_a) / trials_a + p_b * (1 - p_b) / trials_b)
    return TwoSampleDifference(p_b - p_a, variance, units)


# --- percentiles ------------------------------------------------------------------------


def quantile_rank_bounds(
    count: int, quantile: float, alpha: float
) -> tuple[int | None, int | None]:
    """1-based ranks (lower, upper) whose order statistics bound the ``quantile`` of a
    distribution, always-valid at ``alpha``, after ``count`` values; None where the bound
    is open (too few values to bound that side yet).

    Under the event that the share of values at or below the true quantile ξ stays within
    the mixture half-width w of q (probability ≥ 1 − α, variance q(1−q) known), at least
    ⌈n(q − w)⌉ values are ≤ ξ and fewer than ⌊n(q + w)⌋ + 1 are < ξ, so
    X(⌈n(q−w)⌉) ≤ ξ ≤ X(⌊n(q+w)⌋+1).
    """
    if count < 1:
        return None, None
    half = mixture_halfwidth(quantile * (1 - quantile), count, alpha)
    lower_rank = math.ceil(count * (quantile - half))
    upper_rank = math.floor(count * (quantile + half)) + 1
    return (lower_rank if lower_rank >= 1 else None), (upper_rank if upper_rank <= count else None)


def order_statistic(ordered: Sequence[tuple[float, int]], rank: int) -> float:
    """The ``rank``-th smallest value (1-based) of (value, count) pairs sorted by value."""
    seen = 0
    for value, count in ordered:
        seen += count
        if rank <= seen:
            return value
    raise ValueError("rank beyond the number of values")


@dataclass(frozen=True)
class Histogram:
    """Values as (representative value, count), sorted by value; every value counted in a
    pair lies within ``relative_accuracy`` of its representative."""

    ordered: tuple[tuple[float, int], ...]
    relative_accuracy: float = 0.0

    @cached_property
    def _cumulative(self) -> list[int]:
        return list(itertools.accumulate(count for _, count in self.ordered))

    @property
    def count(self) -> int:
        return self._cumulative[-1] if self.ordered else 0

    def _value_at(self, rank: int) -> float:
        """``order_statistic`` by bisection on the cumulative counts."""
        return self.ordered[bisect.bisect_left(self._cumulative, rank)][0]

    def quantile_bounds(self, quantile: float, alpha: float) -> tuple[float, float]:
        """An always-valid interval for the quantile: ranks to values, widened by the
        relative accuracy; an open side is 0 below (values are never negative) or ∞ above."""
        low_rank, high_rank = quantile_rank_bounds(self.count, quantile, alpha)
        low = (
            self._value_at(low_rank) / (1 + self.relative_accuracy) if low_rank is not None else 0.0
        )
        high = (
            self._value_at(high_rank) / (1 - self.relative_accuracy)
            if high_rank is not None
            else math.inf
        )
        return low, high


def _quantile_interval(
    control: Histogram, candidate: Histogram, quantile: float, alpha: float
) -> tuple[float, float]:
    # Each checkpoint's sequence at α/2: both hold together with probability ≥ 1 − α.
    control_low, control_high = control.quantile_bounds(quantile, alpha / 2)
    candidate_low, candidate_high = candidate.quantile_bounds(quantile, alpha / 2)
    return candidate_low - control_high, candidate_high - control_low


@dataclass(frozen=True)
class QuantileDifference:
    """candidate's quantile − control's, with the intervals of ``quantile_bounds``."""

    control: Histogram
    candidate: Histogram
    quantile: float
    estimate: float

    @cached_property
    def _p_value(self) -> float:
        return self._search_p_value()

    def p_value(self) -> float:
        return self._p_value

    def _search_p_value(self) -> float:
        """The smallest α whose interval excludes 0 (the interval only widens as α
        shrinks), found by bisection on log α to within 0.1% of α."""

        def excludes(alpha: float) -> bool:
            low, high = _quantile_interval(self.control, self.candidate, self.quantile, alpha)
            return low > 0 or high < 0

        if not excludes(1.0):
            return 1.0
        low, high = math.log(1e-300), 0.0  # excludes(e^high) is True
        if excludes(math.exp(low)):
            return 0.0
        while high - low > 1e-3:
            middle = (low + high) / 2
            if excludes(math.exp(middle)):
                high = middle
            else:
                low = middle
        return math.exp(high)

    def at(self, alpha: float) -> SequentialEstimate:
        low, high = _quantile_interval(self.control, self.candidate, self.quantile, alpha)
        return SequentialEstimate(self.estimate, low, high, self.p_value(), alpha)


# --- multiple comparisons ---------------------------------------------------------------


@dataclass(frozen=True)
class HolmResult:
    adjusted_p_values: list[float]
    rejected: list[bool]
    #: The level to draw each comparison's interval at, so that it excludes 0 exactly when
    #: Holm rejects: α/(m − r + 1) for the r-th smallest p-value up to the first one Holm
    #: keeps (rank k), and α/(m − k + 1) from there on.
    levels: list[float]


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> HolmResult:
    """Holm's step-down procedure over ``p_values``, with interval levels.

    Written out (numpy, five lines) rather than statsmodels' ``multipletests``, which
    runs a full ``gc.collect()`` on every Holm call: 0.4 s per page in a process with a
    large heap (bench/bench_comparisons.py). The tests check it against ``multipletests``.
    """
    m = len(p_values)
    if m == 0:
        return HolmResult([], [], [])
    import numpy as np

    values = np.asarray(p_values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    multipliers = np.arange(m, 0, -1)  # m − r + 1 for the r-th smallest (1-based)
    adjusted_ranked = np.minimum(1.0, np.maximum.accumulate(ranked * multipliers))
    kept = np.nonzero(ranked > alpha / multipliers)[0]
    first_kept = int(kept[0]) if kept.size else m
    adjusted = [0.0] * m
    rejected = [False] * m
    levels = [0.0] * m
    for rank, index in enumerate(order):
        adjusted[index] = float(adjusted_ranked[rank])
        rejected[index] = rank < first_kept
        levels[index] = alpha / (m - min(rank, first_kept))
    return HolmResult(adjusted, rejected, levels)
