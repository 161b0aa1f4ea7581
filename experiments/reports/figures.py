"""Per-checkpoint figures and the time series, read from the rollups only.

Four queries whatever the traffic: counts and sums, errors by kind, histogram bins
(merged by PostgreSQL), and the series. Each reads the rows ``ReportFilters.rollup_q``
selects: one row set for all time, or the whole buckets of a window.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import Count, Max, Min, Q, Sum

from experiments.models import (
    AllocationSubject,
    ErrorKindRollup,
    Feedback,
    FeedbackRating,
    LatencyBin,
    LatencyMetric,
    RequestRollup,
    RollupResolution,
)
from experiments.quality import ERROR_CATEGORIES, FINISH_REASONS, TOOL_CALLS
from experiments.reports.filters import ReportFilters
from experiments.reports.histogram import percentile
from experiments.reports.rollups import MEASURES
from experiments.selectors import CheckpointSummary, SlotSummary

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "other")
#: Errors recorded before error categories were (they count in no category).
UNCLASSIFIED = "unclassified"
#: Successful answers that reported no finish reason (or were recorded before them).
UNKNOWN_FINISH = "unknown"


@dataclass
class CheckpointStats(CheckpointSummary):
    requests: int = 0
    #: Subjects, users and client request ids first seen on this checkpoint in the
    #: window: all time, the distinct counts.
    distinct_subjects: int = 0
    distinct_users: int = 0
    distinct_messages: int = 0
    #: Subjects first seen in the slot in the window while this checkpoint served it.
    new_slot_subjects: int = 0
    errors: int = 0
    streamed: int = 0
    status_classes: dict[str, int] = field(default_factory=dict)
    #: Errors by category (experiments.quality.ERROR_CATEGORIES, every one, and
    #: ``unclassified`` when some errors predate the categories).
    errors_by_kind: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(ERROR_CATEGORIES, 0)
    )
    #: Errors by the gateway's raw ``error_kind`` (e.g. ``upstream_http_503``).
    errors_by_raw_kind: dict[str, int] = field(default_factory=dict)
    #: Successful answers by finish reason (every one of FINISH_REASONS, and ``unknown``).
    finish_reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*FINISH_REASONS, UNKNOWN_FINISH), 0)
    )
    input_tokens: int = 0
    output_tokens: int = 0
    ttfb_p50: float | None = None
    ttfb_p95: float | None = None
    total_p50: float | None = None
    total_p95: float | None = None
    throughput_p50: float | None = None
    throughput_p95: float | None = None
    total_mean: float | None = None
    total_variance: float | None = None
    total_samples: int = 0
    first_request_at: datetime | None = None
    last_request_at: datetime | None = None
    #: Feedback joined to this checkpoint, by the time of the request it rates.
    feedback_up: int = 0
    feedback_down: int = 0
    #: The merged histogram bins behind the percentiles, (key, count) sorted by key, per
    #: ``LatencyMetric``: the comparisons' percentile intervals read them.
    histograms: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def of(cls, checkpoint: CheckpointSummary) -> CheckpointStats:
        return cls(**vars(checkpoint))

    @property
    def is_current(self) -> bool:
        return self.effective_until is None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def successes(self) -> int:
        return self.requests - self.errors

    @property
    def tool_call_rate(self) -> float | None:
        """Share of successful answers that ended in tool calls."""
        if not self.successes:
            return None
        return self.finish_reasons.get(TOOL_CALLS, 0) / self.successes

    @property
    def feedback_count(self) -> int:
        return self.feedback_up + self.feedback_down

    @property
    def feedback_share_up(self) -> float | None:
        return self.feedback_up / self.feedback_count if self.feedback_count else None

    @property
    def feedback_ci95(self) -> tuple[float, float] | None:
        """95% Wilson score interval of the share positive (statsmodels)."""
        return wilson_interval(self.feedback_up, self.feedback_count)


def wilson_interval(successes: int, trials: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion; None without trials.

    statsmodels rather than the formula by hand: one well-tested implementation for
    every interval the reports show.
    """
    if not trials:
        return None
    from statsmodels.stats.proportion import proportion_confint  # heavy: only for reports

    low, high = proportion_confint(successes, trials, alpha=0.05, method="wilson")
    return float(low), float(high)


@dataclass
class SlotStats:
    slot_id: uuid.UUID
    label: str
    weight: int
    expected_share: float
    #: Subjects first seen in this slot in the window (all time: distinct subjects).
    distinct_subjects: int = 0
    observed_share: float | None = None
    checkpoints: list[CheckpointStats] = field(default_factory=list)
    is_control: bool = False

    @classmethod
    def of(cls, slot: SlotSummary) -> SlotStats:
        return cls(
            slot_id=slot.slot_id,
            label=slot.label,
            weight=slot.weight,
            expected_share=slot.expected_share,
            checkpoints=[CheckpointStats.of(c) for c in slot.checkpoints],
            is_control=slot.is_control,
        )

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.checkpoints)


@dataclass
class TimeSeries:
    bucket_seconds: int
    buckets: list[datetime]
    #: version id -> requests per bucket, aligned with ``buckets``
    counts: dict[uuid.UUID, list[int]]


def _variance(samples: int, total: int, squares: int) -> float | None:
    """Sample variance from exact integer sums (no cancellation error)."""
    if samples < 2:
        return None
    return (samples * squares - total * total) / (samples * (samples - 1))


def fill_figures(by_version: dict[uuid.UUID, CheckpointStats], filters: ReportFilters) -> None:
    """Counts, sums, exact means and variances, percentiles and errors by kind."""
    ids = list(by_version)
    window = filters.rollup_q() & Q(variant_version_id__in=ids)
    sums = {f"sum_{name}": Sum(name) for name in MEASURES}
    rows = (
        RequestRollup.objects.filter(window)
        .order_by()
        .values("variant_version_id")
        .annotate(
            **sums,
            users=Sum("new_subjects", filter=Q(allocation_subject=AllocationSubject.USER)),
            first=Min("first_request_at"),
            last=Max("last_request_at"),
        )
    )
    for row in rows:
        stats = by_version[row["variant_version_id"]]
        total = {name: int(row[f"sum_{name}"] or 0) for name in MEASURES}
        stats.requests = total["requests"]
        stats.errors = total["errors"]
        stats.streamed = total["streamed"]
        stats.status_classes = {
            name: total[f"status_{name}"] for name in STATUS_CLASSES if total[f"status_{name}"]
        }
        stats.input_tokens = total["input_tokens"]
        stats.output_tokens = total["output_tokens"]
        stats.distinct_subjects = total["new_subjects"]
        stats.distinct_users = row["users"] or 0
        stats.distinct_messages = total["new_messages"]
        stats.new_slot_subjects = total["new_slot_subjects"]
        samples, latency_sum = total["total_ms_samples"], total["total_ms_sum"]
        stats.total_samples = samples
        stats.total_mean = latency_sum / samples if samples else None
        stats.total_variance = _variance(samples, latency_sum, total["total_ms_sum_squares"])
        stats.first_request_at, stats.last_request_at = row["first"], row["last"]
        stats.errors_by_kind = {c: total[f"errors_{c}"] for c in ERROR_CATEGORIES}
        unclassified = stats.errors - sum(stats.errors_by_kind.values())
        if unclassified:
            stats.errors_by_kind[UNCLASSIFIED] = unclassified
        stats.finish_reasons = {r: total[f"finish_{r}"] for r in FINISH_REASONS}
        stats.finish_reasons[UNKNOWN_FINISH] = stats.successes - sum(stats.finish_reasons.values())
    for row in (
        ErrorKindRollup.objects.filter(window)
        .order_by()
        .values("variant_version_id", "error_kind")
        .annotate(count=Sum("count"))
    ):
        if row["count"]:
            stats = by_version[row["variant_version_id"]]
            stats.errors_by_raw_kind[row["error_kind"]] = row["count"]
    _fill_percentiles(by_version, filters.histogram_q() & Q(variant_version_id__in=ids))
    _fill_feedback(by_version, filters)


def feedback_q(filters: ReportFilters) -> Q:
    """Joined feedback of the (aligned) window and subject kind, by the time of the
    request it rates: the same requests the other figures count."""
    condition = Q(variant_version_id__isnull=False)
    if filters.since is not None:
        condition &= Q(request_created_at__gte=filters.since)
    if filters.until is not None:
        condition &= Q(request_created_at__lt=filters.until)
    if filters.subject_kind is not None:
        condition &= Q(request_allocation_subject=filters.subject_kind)
    return condition


def _fill_feedback(by_version: dict[uuid.UUID, CheckpointStats], filters: ReportFilters) -> None:
    """Feedback up/down per checkpoint: one grouped query on the feedback table."""
    rows = (
        Feedback.objects.filter(feedback_q(filters), variant_version_id__in=list(by_version))
        .order_by()
        .values("variant_version_id", "rating")
        .annotate(count=Count("*"))
        .values_list("variant_version_id", "rating", "count")
    )
    for version_id, rating, count in rows:
        stats = by_version[version_id]
        if rating == FeedbackRating.UP:
            stats.feedback_up = count
        elif rating == FeedbackRating.DOWN:
            stats.feedback_down = count


_PERCENTILE_FIELDS = {
    LatencyMetric.TTFB: ("ttfb_p50", "ttfb_p95"),
    LatencyMetric.TOTAL: ("total_p50", "total_p95"),
    LatencyMetric.THROUGHPUT: ("throughput_p50", "throughput_p95"),
}


def _fill_percentiles(by_version: dict[uuid.UUID, CheckpointStats], window: Q) -> None:
    bins: dict[tuple[uuid.UUID, int], list[tuple[int, int]]] = {}
    for version_id, metric, key, count in (
        LatencyBin.objects.filter(window)
        .order_by()
        .values("variant_version_id", "metric", "key")
        .annotate(total=Sum("count"))
        .values_list("variant_version_id", "metric", "key", "total")
    ):
        bins.setdefault((version_id, metric), []).append((key, count))
    for (version_id, metric), counted in bins.items():
        merged: dict[int, int] = {}
        for key, count in counted:
            merged[key] = merged.get(key, 0) + count
        by_version[version_id].histograms[int(metric)] = sorted(
            (key, count) for key, count in merged.items() if count > 0
        )
        p50_field, p95_field = _PERCENTILE_FIELDS[LatencyMetric(metric)]
        setattr(by_version[version_id], p50_field, percentile(counted, 0.5))
        setattr(by_version[version_id], p95_field, percentile(counted, 0.95))


# --- time series --------------------------------------------------------------

_BUCKET_SIZES = (
    60,
    5 * 60,
    15 * 60,
    3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    86400,
    7 * 86400,
    30 * 86400,
)
_MAX_BUCKETS = 120


def bucket_seconds_for(span: timedelta) -> int:
    """The smallest bucket that draws the span in at most ``_MAX_BUCKETS`` points."""
    seconds = max(span.total_seconds(), 1)
    for size in _BUCKET_SIZES:
        if seconds / size <= _MAX_BUCKETS:
            return size
    return _BUCKET_SIZES[-1]


def bucket_name(seconds: int) -> str:
    """A chart bucket as people say it: "minute", "15 minutes", "3 hours", "day"."""
    if seconds % 86400 == 0:
        days = seconds // 86400
        return "day" if days == 1 else f"{days} days"
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return "hour" if hours == 1 else f"{hours} hours"
    minutes = seconds // 60
    return "minute" if minutes == 1 else f"{minutes} minutes"


def _levels_for(size: int) -> tuple[int, ...]:
    """Stored resolutions that tile a chart bucket of ``size`` seconds, coarsest first."""
    return tuple(
        int(r)
        for r in (RollupResolution.DAY, RollupResolution.HOUR, RollupResolution.MINUTE)
        if size % r == 0
    )


def timeseries(
    checkpoints: list[CheckpointStats], filters: ReportFilters, now: datetime
) -> TimeSeries:
    """Requests per checkpoint per chart bucket over the window (or from the first to
    the last request), from the coarsest rollups that tile the chart's buckets."""
    firsts = [c.first_request_at for c in checkpoints if c.first_request_at]
    lasts = [c.last_request_at for c in checkpoints if c.last_request_at]
    start, end = filters.span_or(min(firsts, default=None), max(lasts, default=None), now)
    size = bucket_seconds_for(end - start)
    first_bucket = int(start.timestamp()) // size * size
    last_bucket = int(end.timestamp()) // size * size
    starts = list(range(first_bucket, last_bucket + size, size))
    counts = {c.version_id: [0] * len(starts) for c in checkpoints}
    rows = (
        RequestRollup.objects.filter(
            filters.rollup_q(levels=_levels_for(size)), variant_version_id__in=list(counts)
        )
        .order_by()
        .values("variant_version_id", "bucket")
        .annotate(total=Sum("requests"))
        .values_list("variant_version_id", "bucket", "total")
    )
    for version_id, bucket, requests in rows:
        position = (bucket - first_bucket) // size
        if 0 <= position < len(starts):
            counts[version_id][position] += requests
    buckets = [datetime.fromtimestamp(value, tz=UTC) for value in starts]
    return TimeSeries(bucket_seconds=size, buckets=buckets, counts=counts)
