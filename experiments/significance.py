"""Small exact statistics for reports: no scipy needed for three formulas.

- ``chi_square_sf``: survival function of the chi-square distribution, via the
  regularized upper incomplete gamma function Q(k/2, x/2) (series below a+1,
  Lentz continued fraction above, as in Numerical Recipes §6.2).
- ``newcombe_difference_interval``: 95% CI for a difference of two
  proportions by Newcombe's hybrid score method (1998, method 10), built from
  Wilson intervals. Chosen over Wald because error rates sit near 0, where
  Wald intervals collapse to zero width or cross below 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_EPSILON = 1e-15
_MAX_ITERATIONS = 10_000
Z_95 = 1.959963984540054


def _lower_gamma_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its power series (x < a + 1)."""
    term = 1.0 / a
    total = term
    denominator = a
    for _ in range(_MAX_ITERATIONS):
        denominator += 1.0
        term *= x / denominator
        total += term
        if abs(term) < abs(total) * _EPSILON:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _upper_gamma_continued_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by Lentz's method (x >= a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPSILON:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def regularized_upper_gamma(a: float, x: float) -> float:
    if a <= 0:
        raise ValueError("shape must be positive")
    if x <= 0:
        return 1.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _lower_gamma_series(a, x))
    return _upper_gamma_continued_fraction(a, x)


def chi_square_sf(statistic: float, degrees_of_freedom: int) -> float:
    """P(X >= statistic) for X ~ chi-square(degrees_of_freedom)."""
    if degrees_of_freedom < 1:
        raise ValueError("degrees of freedom must be at least 1")
    return regularized_upper_gamma(degrees_of_freedom / 2.0, statistic / 2.0)


def chi_square_goodness_of_fit(
    observed: Sequence[int], weights: Sequence[float]
) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of observed counts against weights."""
    if len(observed) != len(weights) or len(observed) < 2:
        raise ValueError("need at least two categories with one weight each")
    total = sum(observed)
    weight_sum = float(sum(weights))
    statistic = 0.0
    for count, weight in zip(observed, weights, strict=True):
        expected = total * weight / weight_sum
        statistic += (count - expected) ** 2 / expected
    dof = len(observed) - 1
    return statistic, dof, chi_square_sf(statistic, dof)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    if trials <= 0:
        raise ValueError("trials must be positive")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def newcombe_difference_interval(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, z: float = Z_95
) -> tuple[float, float, float]:
    """(difference p_a - p_b, lower, upper) with Newcombe's hybrid score interval."""
    p_a = successes_a / trials_a
    p_b = successes_b / trials_b
    low_a, high_a = wilson_interval(successes_a, trials_a, z)
    low_b, high_b = wilson_interval(successes_b, trials_b, z)
    difference = p_a - p_b
    lower = difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2)
    upper = difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2)
    return difference, lower, upper


def welch_mean_difference_interval(
    mean_a: float, variance_a: float, n_a: int, mean_b: float, variance_b: float, n_b: int
) -> tuple[float, float, float] | None:
    """(mean_a - mean_b, lower, upper), normal approximation with unpooled variances.

    Latency samples here are large (hundreds and up), where the normal quantile
    and Welch's t quantile agree to the shown precision.
    """
    if n_a < 2 or n_b < 2:
        return None
    difference = mean_a - mean_b
    half_width = Z_95 * math.sqrt(variance_a / n_a + variance_b / n_b)
    return difference, difference - half_width, difference + half_width
