"""The sample-ratio check and the comparisons against the control, from figures already read.

SRM: chi-square goodness of fit of the subjects first seen per slot against the
weights. Every subject is counted once, in the slot it was assigned to, so the test
is exact for all time and for any window (it then tests the subjects who arrived in
the window).

Comparisons: the control slot's current checkpoint against each other slot's current
checkpoint (or, on request, against every other checkpoint), metric by metric from
``METRICS``: candidate − control with an always-valid interval (``significance``), Holm
over every comparison shown, and a direction-aware verdict. A metric is one entry in the
table: how to build its difference from two checkpoints' figures, which way is better,
and the method's name.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from experiments.models import LatencyMetric
from experiments.reports.figures import CheckpointStats, SlotStats
from experiments.reports.histogram import RELATIVE_ACCURACY, value_of
from experiments.significance import (
    ALPHA,
    TUNING_SAMPLE_SIZE,
    Histogram,
    QuantileDifference,
    SequentialEstimate,
    TwoSampleDifference,
    chi_square_goodness_of_fit,
    holm,
    mean_difference,
    proportion_difference,
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


# --- comparisons against the control -----------------------------------------------------

METHOD_REFERENCE = (
    "Always-valid 95% confidence sequences (normal-mixture / mixture SPRT; Howard, Ramdas, "
    "McAuliffe & Sekhon, Ann. Statist. 2021; asymptotic form of Waudby-Smith et al., Ann. "
    f"Statist. 2024, as in GrowthBook's sequential testing; tuned for {TUNING_SAMPLE_SIZE:,} "
    "requests), Holm-corrected across the comparisons shown"
)
MEAN_METHOD = "normal-mixture confidence sequence, difference of means"
PROPORTION_METHOD = "normal-mixture confidence sequence, difference of proportions"
QUANTILE_METHOD = (
    "normal-mixture confidence sequences for the percentile of each checkpoint "
    "(rank bounds, histogram values within 1%), combined at α/2 each"
)

Difference = TwoSampleDifference | QuantileDifference


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    #: How values and differences are shown: "rate" (a share), "ms", "tok/s".
    unit: str
    lower_is_better: bool
    method: str
    #: The figure shown per checkpoint.
    value: Callable[[CheckpointStats], float | None]
    #: candidate − control, or None when there is not enough data for an interval.
    difference: Callable[[CheckpointStats, CheckpointStats], Difference | None]
    #: Whether the metric applies to this pair at all (feedback only once there is some).
    applies: Callable[[CheckpointStats, CheckpointStats], bool] = lambda control, cand: True


def _histogram(checkpoint: CheckpointStats, metric: LatencyMetric) -> Histogram:
    """The checkpoint's bins as values, made once per checkpoint and metric (the control's
    is read by every comparison)."""
    made = checkpoint.__dict__.setdefault("_comparison_histograms", {})
    if metric not in made:
        bins = checkpoint.histograms.get(int(metric), [])
        made[metric] = Histogram(
            tuple((value_of(key), count) for key, count in bins), RELATIVE_ACCURACY
        )
    return made[metric]


def _percentile_metric(
    key: str, label: str, metric: LatencyMetric, quantile: float, attribute: str, **kwargs
) -> Metric:
    def difference(control: CheckpointStats, candidate: CheckpointStats):
        a, b = getattr(control, attribute), getattr(candidate, attribute)
        if a is None or b is None:
            return None
        return QuantileDifference(
            _histogram(control, metric), _histogram(candidate, metric), quantile, b - a
        )

    return Metric(
        key=key,
        label=label,
        method=QUANTILE_METHOD,
        value=lambda checkpoint: getattr(checkpoint, attribute),
        difference=difference,
        **kwargs,
    )


def _feedback(checkpoint: CheckpointStats) -> tuple[int, int]:
    """(up, down) when the figures carry feedback counts; (0, 0) otherwise."""
    return int(getattr(checkpoint, "feedback_up", 0) or 0), int(
        getattr(checkpoint, "feedback_down", 0) or 0
    )


def _share_up(checkpoint: CheckpointStats) -> float | None:
    up, down = _feedback(checkpoint)
    return up / (up + down) if up + down else None


def _share_up_difference(control: CheckpointStats, candidate: CheckpointStats):
    (up_a, down_a), (up_b, down_b) = _feedback(control), _feedback(candidate)
    return proportion_difference(up_a, up_a + down_a, up_b, up_b + down_b)


def _latency_mean_difference(control: CheckpointStats, candidate: CheckpointStats):
    if control.total_variance is None or candidate.total_variance is None:
        return None
    return mean_difference(
        control.total_mean,
        control.total_variance,
        control.total_samples,
        candidate.total_mean,
        candidate.total_variance,
        candidate.total_samples,
    )


METRICS: tuple[Metric, ...] = (
    Metric(
        key="error_rate",
        label="Error rate",
        unit="rate",
        lower_is_better=True,
        method=PROPORTION_METHOD,
        value=lambda checkpoint: checkpoint.error_rate,
        difference=lambda control, candidate: proportion_difference(
            control.errors, control.requests, candidate.errors, candidate.requests
        ),
    ),
    Metric(
        key="total_latency_mean",
        label="Total latency, mean",
        unit="ms",
        lower_is_better=True,
        method=MEAN_METHOD + " (exact sums of the rollups)",
        value=lambda checkpoint: checkpoint.total_mean,
        difference=_latency_mean_difference,
    ),
    _percentile_metric(
        "total_latency_p50",
        "Total latency, p50",
        LatencyMetric.TOTAL,
        0.5,
        "total_p50",
        unit="ms",
        lower_is_better=True,
    ),
    _percentile_metric(
        "total_latency_p95",
        "Total latency, p95",
        LatencyMetric.TOTAL,
        0.95,
        "total_p95",
        unit="ms",
        lower_is_better=True,
    ),
    _percentile_metric(
        "throughput_p50",
        "Output throughput, p50",
        LatencyMetric.THROUGHPUT,
        0.5,
        "throughput_p50",
        unit="tok/s",
        lower_is_better=False,
    ),
    Metric(
        key="feedback_share_up",
        label="Feedback, share positive",
        unit="rate",
        lower_is_better=False,
        method=PROPORTION_METHOD,
        value=_share_up,
        difference=_share_up_difference,
        # Shown once either checkpoint has feedback (and the figures carry it at all).
        applies=lambda control, candidate: any(_feedback(control) + _feedback(candidate)),
    ),
)


class Verdict:
    BETTER = "better"
    WORSE = "worse"
    INCONCLUSIVE = "inconclusive"


@dataclass
class MetricComparison:
    """One metric of one candidate checkpoint against the control's current checkpoint:
    ``estimate`` is candidate − control."""

    metric: Metric
    control: CheckpointStats
    candidate: CheckpointStats
    control_value: float | None
    candidate_value: float | None
    estimate: float | None = None
    interval: SequentialEstimate | None = None
    p_value: float | None = None
    adjusted_p_value: float | None = None
    verdict: str = Verdict.INCONCLUSIVE
    #: Why there is no interval (not enough data), when there is none.
    note: str = ""
    _difference: Difference | None = field(default=None, repr=False)

    @property
    def ci(self) -> tuple[float, float] | None:
        return (self.interval.low, self.interval.high) if self.interval else None

    @property
    def level(self) -> float | None:
        """The α the interval is drawn at (Holm-adjusted; the page's α is ``ALPHA``)."""
        return self.interval.alpha if self.interval else None


@dataclass
class Comparisons:
    control_slot_id: uuid.UUID | None
    control_slot_label: str | None
    #: The control slot's current checkpoint; None when it has none (or no requests).
    control: CheckpointStats | None
    rows: list[MetricComparison]
    all_checkpoints: bool
    alpha: float = ALPHA
    #: Why there are no rows, when there are none.
    reason: str = ""

    @property
    def candidates(self) -> list[CheckpointStats]:
        seen: dict[uuid.UUID, CheckpointStats] = {}
        for row in self.rows:
            seen.setdefault(row.candidate.version_id, row.candidate)
        return list(seen.values())

    def rows_for(self, candidate: CheckpointStats) -> list[MetricComparison]:
        return [row for row in self.rows if row.candidate.version_id == candidate.version_id]


def _verdict(metric: Metric, interval: SequentialEstimate, rejected: bool) -> str:
    """Better or worse when Holm rejects (the interval, drawn at the Holm level, then
    excludes 0), in the metric's direction; inconclusive otherwise."""
    if not (rejected and interval.excludes_zero):
        return Verdict.INCONCLUSIVE
    lower = interval.high < 0
    return Verdict.BETTER if lower == metric.lower_is_better else Verdict.WORSE


def compare_to_control(
    slots: list[SlotStats],
    *,
    current: dict[uuid.UUID, CheckpointStats],
    all_checkpoints: bool = False,
    metrics: tuple[Metric, ...] = METRICS,
    alpha: float = ALPHA,
) -> Comparisons:
    """The control slot's current checkpoint against each other slot's current checkpoint
    (``current``: slot id -> its current checkpoint), or against every other checkpoint
    with requests when ``all_checkpoints``; Holm over every row with an interval."""
    control_slot = next((slot for slot in slots if slot.is_control), None)
    if control_slot is None:
        return Comparisons(None, None, None, [], all_checkpoints, alpha, "no slots")
    control = current.get(control_slot.slot_id)
    empty = Comparisons(control_slot.slot_id, control_slot.label, control, [], all_checkpoints)
    empty.alpha = alpha
    if control is None or not control.requests:
        empty.reason = f"the control slot {control_slot.label!r} has no requests in this window"
        return empty
    if all_checkpoints:
        candidates = [
            c
            for slot in slots
            for c in slot.checkpoints
            if c.requests and c.version_id != control.version_id
        ]
    else:
        candidates = [
            current[slot.slot_id]
            for slot in slots
            if slot is not control_slot
            and slot.slot_id in current
            and current[slot.slot_id].requests
        ]
    if not candidates:
        empty.reason = "no other checkpoint has requests in this window"
        return empty
    rows: list[MetricComparison] = []
    for candidate in candidates:
        for metric in metrics:
            if not metric.applies(control, candidate):
                continue
            row = MetricComparison(
                metric=metric,
                control=control,
                candidate=candidate,
                control_value=metric.value(control),
                candidate_value=metric.value(candidate),
            )
            difference = metric.difference(control, candidate)
            if difference is None:
                row.note = "not enough data"
            else:
                row._difference = difference
                row.estimate = difference.estimate
            rows.append(row)
    tested = [row for row in rows if row._difference is not None]
    p_values = [
        row._difference.at(alpha).p_value
        if isinstance(row._difference, TwoSampleDifference)
        else row._difference.p_value()
        for row in tested
    ]
    corrected = holm(p_values, alpha)
    for row, p_value, adjusted, rejected, level in zip(
        tested,
        p_values,
        corrected.adjusted_p_values,
        corrected.rejected,
        corrected.levels,
        strict=True,
    ):
        row.interval = row._difference.at(level)
        row.p_value = p_value
        row.adjusted_p_value = adjusted
        row.verdict = _verdict(row.metric, row.interval, rejected)
    return Comparisons(
        control_slot.slot_id, control_slot.label, control, rows, all_checkpoints, alpha
    )
