"""The sample-ratio check and checkpoint comparisons, from figures already read.

SRM: chi-square goodness of fit of the subjects first seen per slot against the
weights. Every subject is counted once, in the slot it was assigned to, so the test
is exact for all time and for any window (it then tests the subjects who arrived in
the window).
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.reports.figures import CheckpointStats, SlotStats
from experiments.significance import (
    chi_square_goodness_of_fit,
    newcombe_difference_interval,
    welch_mean_difference_interval,
)

#: Below this p-value the split is reported as a sample-ratio mismatch.
SRM_THRESHOLD = 0.001
#: Chi-square needs a handful of expected subjects per slot to be meaningful.
SRM_MIN_EXPECTED = 5


@dataclass
class SrmResult:
    observed: list[int]
    expected: list[float]
    chi_square: float | None
    degrees_of_freedom: int
    p_value: float | None
    reason: str = ""  # why no test was run, when p_value is None

    @property
    def mismatch(self) -> bool:
        return self.p_value is not None and self.p_value < SRM_THRESHOLD


@dataclass
class Comparison:
    """``candidate`` minus ``baseline``."""

    baseline: CheckpointStats
    candidate: CheckpointStats
    error_rate_difference: float | None
    error_rate_ci: tuple[float, float] | None
    ttfb_p50_difference: float | None
    total_p50_difference: float | None
    total_mean_difference: float | None
    total_mean_ci: tuple[float, float] | None

    @property
    def error_rate_significant(self) -> bool:
        return self.error_rate_ci is not None and (
            self.error_rate_ci[0] > 0 or self.error_rate_ci[1] < 0
        )

    @property
    def total_mean_significant(self) -> bool:
        return self.total_mean_ci is not None and (
            self.total_mean_ci[0] > 0 or self.total_mean_ci[1] < 0
        )


def sample_ratio_check(slots: list[SlotStats]) -> SrmResult:
    observed = [slot.distinct_subjects for slot in slots]
    total = sum(observed)
    weight_sum = sum(slot.weight for slot in slots) or 1
    expected = [total * slot.weight / weight_sum for slot in slots]
    dof = max(len(slots) - 1, 0)
    if len(slots) < 2:
        return SrmResult(observed, expected, None, dof, None, "needs at least two slots")
    if total == 0:
        return SrmResult(observed, expected, None, dof, None, "no subjects observed yet")
    if min(expected) < SRM_MIN_EXPECTED:
        return SrmResult(
            observed,
            expected,
            None,
            dof,
            None,
            f"too few subjects (needs at least {SRM_MIN_EXPECTED} expected per slot)",
        )
    statistic, dof, p_value = chi_square_goodness_of_fit(observed, [s.weight for s in slots])
    return SrmResult(observed, expected, statistic, dof, p_value)


def compare(baseline: CheckpointStats, candidate: CheckpointStats) -> Comparison:
    error_difference = error_ci = None
    if baseline.requests and candidate.requests:
        error_difference, low, high = newcombe_difference_interval(
            candidate.errors, candidate.requests, baseline.errors, baseline.requests
        )
        error_ci = (low, high)

    def difference(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    mean_difference = mean_ci = None
    if None not in (
        candidate.total_mean,
        baseline.total_mean,
        candidate.total_variance,
        baseline.total_variance,
    ):
        welch = welch_mean_difference_interval(
            candidate.total_mean,
            candidate.total_variance,
            candidate.total_samples,
            baseline.total_mean,
            baseline.total_variance,
            baseline.total_samples,
        )
        if welch is not None:
            mean_difference, low, high = welch
            mean_ci = (low, high)
    return Comparison(
        baseline=baseline,
        candidate=candidate,
        error_rate_difference=error_difference,
        error_rate_ci=error_ci,
        ttfb_p50_difference=difference(candidate.ttfb_p50, baseline.ttfb_p50),
        total_p50_difference=difference(candidate.total_p50, baseline.total_p50),
        total_mean_difference=mean_difference,
        total_mean_ci=mean_ci,
    )
