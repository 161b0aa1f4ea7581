"""Read side of experiments (SPEC §10): per-checkpoint figures, SRM, comparisons,
time series, the request browser and the feedback join.

Reports group by the exact checkpoint (variant version) first and by slot
second, so a hot-swap never mixes two checkpoints' figures. Every query goes
through ``.values()`` on attribution rows or through ``VariantVersion.objects``,
so none selects the ``encrypted_api_key`` column.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import queue
import re
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from heapq import merge
from itertools import combinations, islice

from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import (
    Avg,
    Count,
    Field,
    Func,
    Max,
    Min,
    Q,
    Sum,
    Variance,
)
from django.utils import timezone

from experiments.models import (
    AllocationSubject,
    Experiment,
    ExperimentRequest,
    Variant,
    VariantVersion,
)
from experiments.significance import (
    chi_square_goodness_of_fit,
    newcombe_difference_interval,
    percentile_linear,
    welch_mean_difference_interval,
)

#: Below this p-value the split is reported as a sample-ratio mismatch.
SRM_THRESHOLD = 0.001
#: Chi-square needs a handful of expected subjects per slot to be meaningful.
SRM_MIN_EXPECTED = 5


class ReportInputError(ValueError):
    """A bad filter or cursor. The message is safe to show."""


# --- filters ------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFilters:
    since: datetime | None = None
    until: datetime | None = None
    subject_kind: str | None = None

    def __post_init__(self):
        if self.subject_kind is not None and self.subject_kind not in AllocationSubject.values:
            raise ReportInputError(
                f"Unknown subject kind {self.subject_kind!r}; "
                f"use one of {', '.join(AllocationSubject.values)}."
            )
        for moment in (self.since, self.until):
            if moment is not None and timezone.is_naive(moment):
                raise ReportInputError("Times must carry a timezone.")
        if self.since and self.until and self.since > self.until:
            raise ReportInputError("'since' must not be after 'until'.")

    def q(self) -> Q:
        condition = Q()
        if self.since is not None:
            condition &= Q(created_at__gte=self.since)
        if self.until is not None:
            condition &= Q(created_at__lt=self.until)
        if self.subject_kind is not None:
            condition &= Q(allocation_subject=self.subject_kind)
        return condition


def parse_moment(raw: str, *, name: str) -> datetime:
    """An ISO 8601 date or date-time; naive values are read as UTC."""
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ReportInputError(
            f"Bad {name} {raw!r}: use ISO 8601, e.g. 2025-01-31 or 2025-01-31T12:00:00Z."
        ) from None
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment, UTC)
    return moment


# --- aggregates ---------------------------------------------------------------


class EpochBucket(Func):
    """Start of the fixed-size time bucket holding a timestamp.

    Epoch seconds on SQLite; on PostgreSQL the bucket's timestamp from
    ``date_bin`` (C integer arithmetic: ~1.5x faster over a million rows than
    ``date_part`` and float division, ~3x faster than numeric ``extract``).
    The caller turns either into epoch seconds (a plain Field: no converter).
    """

    output_field = Field()

    def __init__(self, expression, seconds: int, **extra):
        self.seconds = int(seconds)
        super().__init__(expression, **extra)

    def as_postgresql(self, compiler, connection, **extra_context):
        sql, params = compiler.compile(self.source_expressions[0])
        return (
            f"date_bin('{self.seconds} seconds'::interval, {sql}, "
            "'1970-01-01T00:00:00Z'::timestamptz)",
            params,
        )

    def as_sqlite(self, compiler, connection, **extra_context):
        sql, params = compiler.compile(self.source_expressions[0])
        return (
            f"(CAST(strftime('%%s', {sql}) AS INTEGER) / {self.seconds}) * {self.seconds}",
            params,
        )


# --- result shapes ------------------------------------------------------------


@dataclass
class CheckpointStats:
    version_id: uuid.UUID
    slot_id: uuid.UUID
    slot_label: str
    internal_id: str
    effective_from: datetime
    effective_until: datetime | None  # None: the slot's current checkpoint
    requests: int = 0
    distinct_subjects: int = 0
    distinct_users: int = 0
    distinct_messages: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    ttfb_p50: float | None = None
    ttfb_p95: float | None = None
    total_p50: float | None = None
    total_p95: float | None = None
    total_mean: float | None = None
    total_variance: float | None = None
    total_samples: int = 0
    first_request_at: datetime | None = None
    last_request_at: datetime | None = None

    @property
    def is_current(self) -> bool:
        return self.effective_until is None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass
class SlotStats:
    slot_id: uuid.UUID
    label: str
    weight: int
    expected_share: float
    distinct_subjects: int = 0
    observed_share: float | None = None
    checkpoints: list[CheckpointStats] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.checkpoints)


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


@dataclass
class TimeSeries:
    bucket_seconds: int
    buckets: list[datetime]
    #: version id -> requests per bucket, aligned with ``buckets``
    counts: dict[uuid.UUID, list[int]]


@dataclass
class ExperimentReport:
    experiment: Experiment
    filters: ReportFilters
    slots: list[SlotStats]
    srm: SrmResult
    comparisons: list[Comparison]
    timeseries: TimeSeries
    generated_at: datetime

    @property
    def checkpoints(self) -> list[CheckpointStats]:
        return [c for slot in self.slots for c in slot.checkpoints]

    @property
    def total_requests(self) -> int:
        return sum(slot.requests for slot in self.slots)


# --- structure ----------------------------------------------------------------


def experiment_checkpoints(experiment: Experiment) -> list[SlotStats]:
    """Slots (bucket order) with their checkpoints and effective periods, no figures."""
    variants = list(
        Variant.objects.filter(experiment=experiment).order_by("id").values("id", "label", "weight")
    )
    total_weight = sum(v["weight"] for v in variants) or 1
    versions_by_slot: dict[uuid.UUID, list[dict]] = defaultdict(list)
    for version in (
        VariantVersion.objects.filter(variant__experiment=experiment)
        .order_by("effective_at", "id")
        .values("id", "variant_id", "upstream", "effective_at")
    ):
        versions_by_slot[version["variant_id"]].append(version)
    slots = []
    for variant in variants:
        slot = SlotStats(
            slot_id=variant["id"],
            label=variant["label"],
            weight=variant["weight"],
            expected_share=variant["weight"] / total_weight,
        )
        history = versions_by_slot.get(variant["id"], [])
        for index, version in enumerate(history):
            upstream = version["upstream"] if isinstance(version["upstream"], dict) else {}
            following = history[index + 1] if index + 1 < len(history) else None
            slot.checkpoints.append(
                CheckpointStats(
                    version_id=version["id"],
                    slot_id=variant["id"],
                    slot_label=variant["label"],
                    internal_id=str(upstream.get("internal_id", "")),
                    effective_from=version["effective_at"],
                    effective_until=following["effective_at"] if following else None,
                )
            )
        slots.append(slot)
    return slots


# --- figures ------------------------------------------------------------------


def _attributed(version_ids, filters: ReportFilters):
    return ExperimentRequest.objects.filter(filters.q(), variant_version_id__in=version_ids)


def _fill_figures(checkpoints: dict[uuid.UUID, CheckpointStats], filters: ReportFilters) -> None:
    """SQLite: counts, sums, means per checkpoint, then percentiles in Python.

    PostgreSQL reads the same figures through ``_fill_counts_and_timeseries``
    and ``_fill_latency`` (side by side, cheaper on a large experiment).
    """
    aggregates = {
        "requests": Count("*"),
        "errors": Count("created_at", filter=Q(has_error=True)),
        "input_tokens": Sum("input_tokens"),
        "output_tokens": Sum("output_tokens"),
        "total_mean": Avg("total_ms"),
        "total_variance": Variance("total_ms", sample=True),
        "total_samples": Count("total_ms"),
        "first_request_at": Min("created_at"),
        "last_request_at": Max("created_at"),
    }
    rows = (
        _attributed(list(checkpoints), filters)
        .order_by()
        .values("variant_version_id")
        .annotate(**aggregates)
    )
    for row in rows:
        stats = checkpoints[row.pop("variant_version_id")]
        for name, value in row.items():
            setattr(stats, name, value)
        stats.input_tokens = stats.input_tokens or 0
        stats.output_tokens = stats.output_tokens or 0
    _fill_percentiles_in_python(checkpoints, filters)


def _fill_percentiles_in_python(
    checkpoints: dict[uuid.UUID, CheckpointStats], filters: ReportFilters
) -> None:
    """SQLite has no percentile_cont: same definition, computed from the values."""
    ttfb: dict[uuid.UUID, list[int]] = defaultdict(list)
    total: dict[uuid.UUID, list[int]] = defaultdict(list)
    for version_id, ttfb_ms, total_ms in _attributed(list(checkpoints), filters).values_list(
        "variant_version_id", "ttfb_ms", "total_ms"
    ):
        if ttfb_ms is not None:
            ttfb[version_id].append(ttfb_ms)
        if total_ms is not None:
            total[version_id].append(total_ms)
    for version_id, stats in checkpoints.items():
        stats.ttfb_p50 = percentile_linear(ttfb[version_id], 0.5)
        stats.ttfb_p95 = percentile_linear(ttfb[version_id], 0.95)
        stats.total_p50 = percentile_linear(total[version_id], 0.5)
        stats.total_p95 = percentile_linear(total[version_id], 0.95)


def _filter_sql(filters: ReportFilters, alias: str) -> tuple[str, list]:
    """``ReportFilters.q()`` as SQL conditions (each starting with AND) on ``alias``."""
    conditions, params = [], []
    if filters.since is not None:
        conditions.append(f"AND {alias}.created_at >= %s")
        params.append(filters.since)
    if filters.until is not None:
        conditions.append(f"AND {alias}.created_at < %s")
        params.append(filters.until)
    if filters.subject_kind is not None:
        conditions.append(f"AND {alias}.allocation_subject = %s")
        params.append(filters.subject_kind)
    return " ".join(conditions), params


def _fill_latency(stats: CheckpointStats, filters: ReportFilters) -> None:
    """PostgreSQL: p50/p95 (``percentile_cont``), mean and variance of one checkpoint's
    latencies, in one statement. One job per checkpoint, so the report's connections
    share the sorts evenly; both percentiles of a column come from one sort.
    """
    conditions, params = _filter_sql(filters, "r")
    # Interpolated: a table name and fixed condition text (values stay in params).
    sql = f"""
        SELECT percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY r.ttfb_ms),
               percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY r.total_ms),
               avg(r.total_ms), var_samp(r.total_ms), count(r.total_ms)
        FROM {ExperimentRequest._meta.db_table} r
        WHERE r.variant_version_id = %s {conditions}
    """  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [stats.version_id, *params])
        ttfb, total, mean, variance, samples = cursor.fetchone()
    # percentile_cont, avg and var_samp ignore NULLs; no values at all gives NULL.
    stats.ttfb_p50, stats.ttfb_p95 = ttfb or (None, None)
    stats.total_p50, stats.total_p95 = total or (None, None)
    stats.total_mean = float(mean) if mean is not None else None
    stats.total_variance = float(variance) if variance is not None else None
    stats.total_samples = samples


def _counts_by_time_range(
    version_ids: list[uuid.UUID], bounds: list[datetime], filters: ReportFilters
) -> list[tuple]:
    """PostgreSQL: requests, errors and tokens per checkpoint and time range,
    the ranges being ``[-infinity, *bounds, infinity]``.

    Each (checkpoint, range) is one range of the (variant_version, created_at)
    covering index aggregated in order: no sort and no hash table, unlike a
    GROUP BY over the bucket expression (~190 ms for 1M rows, this ~125 ms),
    and the per-checkpoint counts come from the same pass, so no other query
    reads every row for them. Rows ``(version_id, range number from 1,
    requests, errors, input_tokens, output_tokens)``.
    """
    conditions, params = _filter_sql(filters, "r")
    # Interpolated: a table name and fixed condition text (values stay in params).
    sql = f"""
        SELECT v.id, t.n, a.requests, a.errors, a.input_tokens, a.output_tokens
        FROM unnest(%s::uuid[]) AS v(id)
        CROSS JOIN (
            SELECT b.n, b.lo, lead(b.lo) OVER (ORDER BY b.n) AS hi
            FROM unnest(ARRAY['-infinity'::timestamptz] || %s::timestamptz[]
                        || ARRAY['infinity'::timestamptz]) WITH ORDINALITY AS b(lo, n)
        ) AS t
        CROSS JOIN LATERAL (
            SELECT COUNT(*) AS requests,
                   COUNT(*) FILTER (WHERE r.has_error) AS errors,
                   COALESCE(SUM(r.input_tokens), 0) AS input_tokens,
                   COALESCE(SUM(r.output_tokens), 0) AS output_tokens
            FROM {ExperimentRequest._meta.db_table} r
            WHERE r.variant_version_id = v.id
              AND r.created_at >= t.lo AND r.created_at < t.hi
              {conditions}
        ) AS a
        WHERE t.hi IS NOT NULL AND a.requests > 0
    """  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [list(version_ids), list(bounds), *params])
        return cursor.fetchall()


def _distinct_pairs_sql(queryset, column: str, *, count_user_rows: bool) -> tuple[str, tuple]:
    """SQL for the distinct (checkpoint, column) pairs of ``queryset``.

    GROUP BY over the (variant_version, column) index reads the pairs in order,
    so counting them afterwards needs neither a sort nor a hash table of a
    million rows (count(DISTINCT) sorts inside the aggregate).
    """
    inner = (
        queryset.filter(**{f"{column}__isnull": False})
        .order_by()
        .values("variant_version_id", column)
    )
    if count_user_rows:
        inner = inner.annotate(
            user_rows=Count("created_at", filter=Q(allocation_subject=AllocationSubject.USER))
        )
    else:
        inner = inner.distinct()
    return inner.query.sql_with_params()


def _fill_subjects(slots: list[SlotStats], filters: ReportFilters) -> None:
    """Distinct subjects and users per checkpoint, distinct subjects per slot.

    A subject seen before and after a hot-swap counts once for its slot. A user
    subject's pseudonym is a function of the user id alone (SPEC §7 seed), so
    distinct user subjects are distinct users, without storing the user id.
    """
    for slot in slots:
        _fill_subjects_of_slot(slot, filters)
    _fill_observed_shares(slots)


def _fill_observed_shares(slots: list[SlotStats]) -> None:
    total = sum(slot.distinct_subjects for slot in slots)
    for slot in slots:
        slot.observed_share = slot.distinct_subjects / total if total else None


def _fill_subjects_of_slot(slot: SlotStats, filters: ReportFilters) -> None:
    """``_fill_subjects`` for one slot: a report job (slots are disjoint)."""
    checkpoints = {c.version_id: c for c in slot.checkpoints}
    if not checkpoints:
        return
    pairs_sql, params = _distinct_pairs_sql(
        _attributed(list(checkpoints), filters), "allocation_subject_hash", count_user_rows=True
    )
    version_table = VariantVersion._meta.db_table
    # PostgreSQL computes the pairs once for both levels (a CTE read twice).
    materialized = "MATERIALIZED " if connection.vendor == "postgresql" else ""
    # Interpolated: Django-compiled SQL (values stay in ``params``) and a table name.
    sql = f"""
        WITH pairs AS {materialized}({pairs_sql})
        SELECT 'version', variant_version_id, COUNT(*),
               SUM(CASE WHEN user_rows > 0 THEN 1 ELSE 0 END)
        FROM pairs GROUP BY variant_version_id
        UNION ALL
        SELECT 'slot', v.variant_id, COUNT(DISTINCT pairs.allocation_subject_hash), 0
        FROM pairs JOIN {version_table} v ON v.id = pairs.variant_version_id
        GROUP BY v.variant_id
    """  # noqa: S608
    with _pairs_in_index_order(filters), connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    for level, key, subjects, users in rows:
        key = key if isinstance(key, uuid.UUID) else uuid.UUID(str(key))
        if level == "version":
            checkpoints[key].distinct_subjects = subjects
            checkpoints[key].distinct_users = int(users or 0)
        else:
            slot.distinct_subjects = subjects


def _fill_messages(checkpoints: dict[uuid.UUID, CheckpointStats], filters: ReportFilters) -> None:
    """Distinct client request ids (messages) per checkpoint."""
    pairs_sql, params = _distinct_pairs_sql(
        _attributed(list(checkpoints), filters), "client_request_id", count_user_rows=False
    )
    with _pairs_in_index_order(filters), connection.cursor() as cursor:
        cursor.execute(
            f"SELECT variant_version_id, COUNT(*) FROM ({pairs_sql}) pairs "  # noqa: S608
            "GROUP BY variant_version_id",
            params,
        )
        for key, messages in cursor.fetchall():
            key = key if isinstance(key, uuid.UUID) else uuid.UUID(str(key))
            checkpoints[key].distinct_messages = messages


def _fill_messages_of(stats: CheckpointStats, filters: ReportFilters) -> None:
    """Distinct client request ids (messages) of one checkpoint, as a report job.

    A plain COUNT over the checkpoint's distinct pairs: grouping them by a
    single checkpoint again made PostgreSQL sort all of them first (250 ms
    instead of 80 ms for 500,000 rows).
    """
    pairs_sql, params = _distinct_pairs_sql(
        _attributed([stats.version_id], filters), "client_request_id", count_user_rows=False
    )
    with _pairs_in_index_order(filters), connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM ({pairs_sql}) pairs", params)  # noqa: S608
        stats.distinct_messages = cursor.fetchone()[0]


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


def _request_span(
    version_ids: list[uuid.UUID], filters: ReportFilters
) -> dict[uuid.UUID, tuple[datetime, datetime]]:
    """First and last request time per checkpoint that has any: an index lookup each.

    Asked separately, not taken from the figures query, so the time series does
    not wait for it (the report's queries run side by side).
    """
    spans = {}
    for version_id in version_ids:
        span = _attributed([version_id], filters).aggregate(
            first=Min("created_at"), last=Max("created_at")
        )
        if span["first"] is not None:
            spans[version_id] = (span["first"], span["last"])
    return spans


def _bucket_starts(
    spans: dict[uuid.UUID, tuple[datetime, datetime]], filters: ReportFilters, now: datetime
) -> tuple[int, list[int]]:
    """Bucket size and bucket starts (epoch seconds) the time series is drawn with."""
    firsts = [first for first, _ in spans.values()]
    lasts = [last for _, last in spans.values()]
    # A chosen window is drawn whole (an empty stretch is information); "all"
    # spans the first to the last request.
    start = filters.since or (min(firsts) if firsts else now - timedelta(hours=1))
    if filters.until:
        end = filters.until
    elif filters.since or not lasts:
        end = now
    else:
        end = max(lasts)
    end = max(end, start)
    size = bucket_seconds_for(end - start)
    first_bucket = int(start.timestamp()) // size * size
    last_bucket = int(end.timestamp()) // size * size
    return size, list(range(first_bucket, last_bucket + size, size))


def _timeseries(
    checkpoints: list[CheckpointStats], filters: ReportFilters, now: datetime
) -> TimeSeries:
    spans = _request_span([c.version_id for c in checkpoints], filters)
    size, starts = _bucket_starts(spans, filters, now)
    index = {value: position for position, value in enumerate(starts)}
    counts = {c.version_id: [0] * len(starts) for c in checkpoints}
    rows = (
        _attributed(list(counts), filters)
        .order_by()
        .values("variant_version_id", bucket=EpochBucket("created_at", size))
        .annotate(requests=Count("*"))
        .values_list("variant_version_id", "bucket", "requests")
    )
    for version_id, bucket, requests in rows:
        epoch = int(bucket.timestamp()) if isinstance(bucket, datetime) else int(bucket)
        position = index.get(epoch)
        if position is not None:
            counts[version_id][position] += requests
    buckets = [datetime.fromtimestamp(value, tz=UTC) for value in starts]
    return TimeSeries(bucket_seconds=size, buckets=buckets, counts=counts)


def _fill_counts_and_timeseries(
    by_version: dict[uuid.UUID, CheckpointStats], filters: ReportFilters, now: datetime
) -> TimeSeries:
    """PostgreSQL: the time series and each checkpoint's requests, errors, tokens,
    first and last request, from one in-order pass over the measures index.

    The ranges before the first and after the last bucket are read too, so the
    checkpoint figures hold every row the filters select (a row written after
    ``now`` included), while the series shows its buckets only, as ``_timeseries``.
    """
    spans = _request_span(list(by_version), filters)
    size, starts = _bucket_starts(spans, filters, now)
    bounds = [datetime.fromtimestamp(value, tz=UTC) for value in [*starts, starts[-1] + size]]
    counts = {version_id: [0] * len(starts) for version_id in by_version}
    rows = _counts_by_time_range(list(by_version), bounds, filters)
    for version_id, number, requests, errors, input_tokens, output_tokens in rows:
        stats = by_version[version_id]
        stats.requests += requests
        stats.errors += errors
        stats.input_tokens += int(input_tokens)
        stats.output_tokens += int(output_tokens)
        # Range 1 is (-infinity, first bucket); ranges 2.. are the buckets.
        position = number - 2
        if 0 <= position < len(starts):
            counts[version_id][position] = requests
    # The span lookups ran in this transaction too: same snapshot as the counts.
    for version_id, (first, last) in spans.items():
        by_version[version_id].first_request_at = first
        by_version[version_id].last_request_at = last
    buckets = [datetime.fromtimestamp(value, tz=UTC) for value in starts]
    return TimeSeries(bucket_seconds=size, buckets=buckets, counts=counts)


#: PostgreSQL settings for the report's own transaction only (SET LOCAL): the
#: percentile sorts of a large checkpoint (~8 bytes a value) then stay in
#: memory instead of spilling to disk. A report runs at most once a minute per
#: experiment and filter (the cache below), so the memory is bounded.
REPORT_SESSION_SETTINGS = {"work_mem": "64MB"}


@contextlib.contextmanager
def _pairs_in_index_order(filters: ReportFilters):
    """Count distinct pairs by reading their index in order, not with a hash table.

    Without a time window every index entry of the checkpoints is read either
    way, and the GroupAggregate over the (variant_version, value) index needs
    no sort and no hash; with a report's work_mem the planner estimates hashing
    a million pairs as cheaper, which measured 2-3x slower (bench/RESULTS.md).
    With a window the planner's own choice (a range of the created_at index,
    then a hash of the fewer rows) is the faster one, so it is left alone.
    Scoped to the report's transaction and restored afterwards.
    """
    windowed = filters.since is not None or filters.until is not None
    if connection.vendor != "postgresql" or not connection.in_atomic_block or windowed:
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('enable_hashagg', 'off', true)")
        try:
            yield
        finally:
            cursor.execute("SELECT set_config('enable_hashagg', 'on', true)")


def _apply_session_settings(cursor) -> None:
    for name, value in REPORT_SESSION_SETTINGS.items():
        cursor.execute("SELECT set_config(%s, %s, true)", [name, value])


@contextlib.contextmanager
def report_session():
    """One transaction for the report's queries, with ``REPORT_SESSION_SETTINGS``."""
    if connection.vendor != "postgresql":
        yield
        return
    with transaction.atomic(), connection.cursor() as cursor:
        _apply_session_settings(cursor)
        yield


#: Connections a report's queries are spread over (PostgreSQL, outside a
#: transaction). Each query is one CPU-bound scan; on a 2-core database server
#: two at a time nearly halves the wall time, more only queue for the cores.
REPORT_CONNECTIONS = 2
_SNAPSHOT_ID = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")


def _run_in_snapshot(snapshot: str, jobs: queue.SimpleQueue) -> None:
    """Worker thread: its own connection, reading the report's exported snapshot."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            _apply_session_settings(cursor)
            _drain(jobs)
    finally:
        connection.close()


def _drain(jobs: queue.SimpleQueue) -> None:
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        job()


def _run_report_queries(jobs: list) -> None:
    """Run independent report queries, side by side on PostgreSQL when possible.

    Every connection reads the same exported snapshot (REPEATABLE READ), so the
    figures are as consistent as from one connection: a request written
    meanwhile is in all of them or in none. Inside an open transaction (a
    caller's atomic block, or a test) other connections could not see its rows,
    so the queries then run one after the other on this connection. Jobs fill
    disjoint fields of the report's objects.
    """
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        pending.put(job)
    concurrent = (
        connection.vendor == "postgresql"
        and not connection.in_atomic_block
        and REPORT_CONNECTIONS > 1
        and len(jobs) > 1
    )
    if not concurrent:
        with report_session():
            _drain(pending)
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        _apply_session_settings(cursor)
        cursor.execute("SELECT pg_export_snapshot()")
        snapshot = cursor.fetchone()[0]
        if not _SNAPSHOT_ID.match(snapshot):
            raise RuntimeError("unexpected snapshot id from PostgreSQL")
        workers = min(REPORT_CONNECTIONS - 1, len(jobs) - 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="report") as pool:
            futures = [pool.submit(_run_in_snapshot, snapshot, pending) for _ in range(workers)]
            _drain(pending)
            for future in futures:
                future.result()


def experiment_report(
    experiment: Experiment, filters: ReportFilters | None = None
) -> ExperimentReport:
    """Everything the stats page and ``experiment_report`` show.

    On PostgreSQL small jobs (counts and time series; latency and messages per
    checkpoint; subjects per slot), each a scan of one covering index, run side
    by side (``_run_report_queries``); on SQLite four queries, one after another.
    """
    filters = filters or ReportFilters()
    now = timezone.now()
    slots = experiment_checkpoints(experiment)
    by_version = {c.version_id: c for slot in slots for c in slot.checkpoints}
    checkpoints = list(by_version.values())
    series: list[TimeSeries] = []
    if by_version and connection.vendor == "postgresql":
        # Small jobs (per slot or checkpoint), so the two connections finish
        # close together. Bench, 1M rows, ms of one core: subjects ~100 per
        # slot, counts and series ~120, latency ~110 and messages ~90 per
        # 500k-row checkpoint (bench/RESULTS.md).
        jobs = [
            *(lambda slot=slot: _fill_subjects_of_slot(slot, filters) for slot in slots),
            lambda: series.append(_fill_counts_and_timeseries(by_version, filters, now)),
            *(lambda stats=stats: _fill_latency(stats, filters) for stats in checkpoints),
            *(lambda stats=stats: _fill_messages_of(stats, filters) for stats in checkpoints),
        ]
    elif by_version:
        jobs = [
            lambda: _fill_figures(by_version, filters),
            lambda: series.append(_timeseries(checkpoints, filters, now)),
            lambda: _fill_messages(by_version, filters),
            lambda: _fill_subjects(slots, filters),
        ]
    else:
        jobs = [lambda: series.append(_timeseries(checkpoints, filters, now))]
    _run_report_queries(jobs)
    _fill_observed_shares(slots)
    served = [c for c in checkpoints if c.requests]
    comparisons = [compare(a, b) for a, b in combinations(served, 2)]
    return ExperimentReport(
        experiment=experiment,
        filters=filters,
        slots=slots,
        srm=sample_ratio_check(slots),
        comparisons=comparisons,
        timeseries=series[0],
        generated_at=now,
    )


REPORT_CACHE_SECONDS = 60


def cached_experiment_report(
    experiment: Experiment, filters: ReportFilters, *, seconds: int = REPORT_CACHE_SECONDS
) -> ExperimentReport:
    """The stats page's report, reused for up to ``seconds`` per experiment and filters.

    On a large experiment the exact distinct counts and percentiles take seconds;
    a page that is at most a minute old is what an operator watching a rollout
    needs, and repeated loads stay cheap. The report holds figures and labels
    only: no key, ciphertext or subject identity goes to the cache.
    """
    key = "mx:report:{}:{}:{}:{}".format(
        experiment.pk,
        filters.since.isoformat() if filters.since else "-",
        filters.until.isoformat() if filters.until else "-",
        filters.subject_kind or "-",
    )
    try:
        report = cache.get(key)
    except Exception:  # a cache outage must not take the stats page down
        report = None
    if report is None:
        report = experiment_report(experiment, filters)
        with contextlib.suppress(Exception):
            cache.set(key, report, seconds)
    return report


# --- request browser ----------------------------------------------------------

BROWSER_PAGE_SIZE = 50

_BROWSER_COLUMNS = (
    "usage_id",
    "created_at",
    "variant_version_id",
    "allocation_subject",
    "client_request_id",
    "request_kind",
    "request_body_sha256",
    "was_truncated",
    "status_code",
    "has_error",
    "input_tokens",
    "output_tokens",
    "ttfb_ms",
    "total_ms",
)


@dataclass(frozen=True)
class BrowserFilters:
    slot: uuid.UUID | None = None
    checkpoint: uuid.UUID | None = None
    subject_kind: str | None = None
    status: str | None = None  # "ok", "error" or a status code
    client_request_id: str | None = None

    def __post_init__(self):
        if self.subject_kind is not None and self.subject_kind not in AllocationSubject.values:
            raise ReportInputError(f"Unknown subject kind {self.subject_kind!r}.")
        if (
            self.status is not None
            and self.status not in ("ok", "error")
            and not (self.status.isdigit() and 100 <= int(self.status) <= 599)
        ):
            raise ReportInputError("Status must be 'ok', 'error' or an HTTP status code.")
        if self.client_request_id is not None and "\x00" in self.client_request_id:
            # PostgreSQL text cannot hold NUL, so no stored id can match it.
            raise ReportInputError("The client request id filter contains a NUL character.")

    def q(self) -> Q:
        condition = Q()
        if self.subject_kind:
            condition &= Q(allocation_subject=self.subject_kind)
        if self.status == "ok":
            condition &= Q(has_error=False)
        elif self.status == "error":
            condition &= Q(has_error=True)
        elif self.status:
            condition &= Q(status_code=int(self.status))
        if self.client_request_id:
            condition &= Q(client_request_id=self.client_request_id)
        return condition


@dataclass
class RequestRow:
    usage_id: uuid.UUID
    created_at: datetime
    version_id: uuid.UUID
    slot_label: str
    internal_id: str
    allocation_subject: str
    client_request_id: str | None
    request_kind: str
    request_body_sha256: str
    was_truncated: bool
    status_code: int
    has_error: bool
    input_tokens: int
    output_tokens: int
    ttfb_ms: int | None
    total_ms: int | None


@dataclass
class RequestPage:
    rows: list[RequestRow]
    next_cursor: str | None


def encode_cursor(created_at: datetime, usage_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(usage_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_raw, usage_raw = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_at = datetime.fromisoformat(created_raw)
        usage_id = uuid.UUID(usage_raw)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ReportInputError(
            "This page link is invalid; start again from the first page."
        ) from None
    if timezone.is_naive(created_at):
        raise ReportInputError("This page link is invalid; start again from the first page.")
    return created_at, usage_id


def _version_labels(experiment: Experiment) -> dict[uuid.UUID, tuple[uuid.UUID, str, str]]:
    """version id -> (slot id, slot label, internal id)."""
    return {
        row["id"]: (
            row["variant_id"],
            row["variant__label"],
            str((row["upstream"] or {}).get("internal_id", "")),
        )
        for row in VariantVersion.objects.filter(variant__experiment=experiment).values(
            "id", "variant_id", "variant__label", "upstream"
        )
    }


def _to_row(values: dict, labels: dict) -> RequestRow:
    _, slot_label, internal_id = labels[values["variant_version_id"]]
    return RequestRow(
        usage_id=values["usage_id"],
        created_at=values["created_at"],
        version_id=values["variant_version_id"],
        slot_label=slot_label,
        internal_id=internal_id,
        allocation_subject=values["allocation_subject"],
        client_request_id=values["client_request_id"],
        request_kind=values["request_kind"],
        request_body_sha256=values["request_body_sha256"],
        was_truncated=values["was_truncated"],
        status_code=values["status_code"],
        has_error=values["has_error"],
        input_tokens=values["input_tokens"],
        output_tokens=values["output_tokens"],
        ttfb_ms=values["ttfb_ms"],
        total_ms=values["total_ms"],
    )


def browse_requests(
    experiment: Experiment,
    filters: BrowserFilters | None = None,
    *,
    cursor: str | None = None,
    page_size: int = BROWSER_PAGE_SIZE,
) -> RequestPage:
    """One page of attributed requests, newest first, keyset-paginated.

    Each checkpoint is read through its own (variant_version, created_at,
    usage_id) index range, newest first, and the few per-checkpoint pages are
    merged here: a deep page costs the same as the first, whatever else the
    table holds.
    """
    filters = filters or BrowserFilters()
    labels = _version_labels(experiment)
    version_ids = [
        version_id
        for version_id, (slot_id, _, _) in labels.items()
        if (filters.slot is None or slot_id == filters.slot)
        and (filters.checkpoint is None or version_id == filters.checkpoint)
    ]
    position = decode_cursor(cursor) if cursor else None
    per_version = []
    for version_id in version_ids:
        queryset = ExperimentRequest.objects.filter(filters.q(), variant_version_id=version_id)
        if position is not None:
            created_at, usage_id = position
            # "<= then tie-break" keeps the index range bounded by created_at.
            queryset = queryset.filter(created_at__lte=created_at).filter(
                Q(created_at__lt=created_at) | Q(usage_id__lt=usage_id)
            )
        per_version.append(
            list(
                queryset.order_by("-created_at", "-usage_id").values(*_BROWSER_COLUMNS)[
                    : page_size + 1
                ]
            )
        )
    newest_first = merge(
        *per_version, key=lambda row: (row["created_at"], row["usage_id"]), reverse=True
    )
    page = list(islice(newest_first, page_size + 1))
    rows = [_to_row(values, labels) for values in page[:page_size]]
    next_cursor = None
    if len(page) > page_size:
        last = rows[-1]
        next_cursor = encode_cursor(last.created_at, last.usage_id)
    return RequestPage(rows=rows, next_cursor=next_cursor)


def request_detail(experiment: Experiment, usage_id: uuid.UUID) -> RequestRow | None:
    labels = _version_labels(experiment)
    values = (
        ExperimentRequest.objects.filter(usage_id=usage_id, variant_version_id__in=list(labels))
        .values(*_BROWSER_COLUMNS)
        .first()
    )
    return _to_row(values, labels) if values else None


# --- feedback join ------------------------------------------------------------


@dataclass
class FeedbackMatch:
    client_request_id: str
    rows: list[RequestRow]


def feedback_join(experiment: Experiment, client_request_ids: list[str]) -> list[FeedbackMatch]:
    """Which checkpoint served each client request id (retries can give several rows)."""
    labels = _version_labels(experiment)
    found: dict[str, list[RequestRow]] = defaultdict(list)
    chunk = 1000
    for start in range(0, len(client_request_ids), chunk):
        for values in (
            ExperimentRequest.objects.filter(
                client_request_id__in=client_request_ids[start : start + chunk],
                variant_version_id__in=list(labels),
            )
            .order_by("created_at", "usage_id")
            .values(*_BROWSER_COLUMNS)
        ):
            found[values["client_request_id"]].append(_to_row(values, labels))
    return [FeedbackMatch(rid, found.get(rid, [])) for rid in client_request_ids]
