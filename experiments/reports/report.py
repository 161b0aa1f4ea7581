"""Everything the stats page and ``experiment_report`` show, from the rollups only.

Reports group by the exact checkpoint (variant version) first and by slot second, so
a hot-swap never mixes two checkpoints' figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.utils import timezone

from experiments.models import Experiment
from experiments.quality import (
    ERROR_CATEGORIES,
    ERROR_CATEGORY_LABELS,
    ERROR_CATEGORY_MEANING,
    FINISH_REASON_LABELS,
    FINISH_REASON_MEANING,
    FINISH_REASONS,
)
from experiments.reports.figures import (
    UNCLASSIFIED,
    UNKNOWN_FINISH,
    CheckpointStats,
    SlotStats,
    TimeSeries,
    bucket_name,
    fill_figures,
    timeseries,
)
from experiments.reports.filters import ReportFilters, bucket_ranges
from experiments.reports.histogram import RELATIVE_ACCURACY
from experiments.reports.statistics import (
    METHOD_REFERENCE,
    Comparisons,
    SrmResult,
    compare_to_control,
    sample_ratio_check,
)
from experiments.selectors import slot_histories

#: A finish reason's cell: (count, share of successful answers).
FinishCell = tuple[int, float | None]


@dataclass
class ExperimentReport:
    experiment: Experiment
    #: The window as computed: moved out to whole minutes (``filters.widened``).
    filters: ReportFilters
    slots: list[SlotStats]
    srm: SrmResult
    #: The control slot's current checkpoint against the others (``statistics``).
    comparisons: Comparisons
    timeseries: TimeSeries
    generated_at: datetime
    #: The database the figures were read from, as "PostgreSQL 16.4" or "SQLite 3.45.1".
    database: str = ""

    @property
    def checkpoints(self) -> list[CheckpointStats]:
        return [c for slot in self.slots for c in slot.checkpoints]

    @property
    def total_requests(self) -> int:
        return sum(slot.requests for slot in self.slots)

    @property
    def error_kind_columns(self) -> list[tuple[str, str]]:
        """(name, label) of the error categories; ``unclassified`` only when some are."""
        columns = [(name, ERROR_CATEGORY_LABELS[name]) for name in ERROR_CATEGORIES]
        if any(c.errors_by_kind.get(UNCLASSIFIED) for c in self.checkpoints):
            columns.append((UNCLASSIFIED, UNCLASSIFIED))
        return columns

    @property
    def finish_columns(self) -> list[tuple[str, str]]:
        return [(name, FINISH_REASON_LABELS[name]) for name in (*FINISH_REASONS, UNKNOWN_FINISH)]

    @property
    def quality_rows(
        self,
    ) -> list[tuple[CheckpointStats, list[int], list[tuple[int, float | None]]]]:
        """Per checkpoint: its error counts by ``error_kind_columns`` and its (count, share
        of successful answers) by ``finish_columns``, for the stats page."""
        errors, finishes = self.error_kind_columns, self.finish_columns
        rows = []
        for c in self.checkpoints:
            successes = c.successes
            rows.append(
                (
                    c,
                    [c.errors_by_kind.get(name, 0) for name, _ in errors],
                    [
                        (count, count / successes if successes else None)
                        for count in (c.finish_reasons.get(name, 0) for name, _ in finishes)
                    ],
                )
            )
        return rows

    @property
    def windowed(self) -> bool:
        return self.filters.since is not None or self.filters.until is not None

    @property
    def notes(self) -> list[str]:
        """What the figures mean where it is not obvious: on the page and in exports."""
        notes = [
            f"Computed on {self.database or 'this database'} from the rollup tables (kept "
            f"up to date as requests are recorded){self._buckets_read()}; no raw request "
            "rows were read.",
            f"Percentiles come from log-bucket histograms, within {RELATIVE_ACCURACY:.0%} of "
            "the exact value (linear interpolation, as PostgreSQL percentile_cont); counts, "
            "sums, means and subjects are exact.",
        ]
        if self.filters.widened:
            span = " to ".join(
                moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "now"
                for moment in (self.filters.since, self.filters.until)
            )
            notes.append(
                f"The window was widened to whole minutes ({span}): rollups are per minute."
            )
        hours = self.filters.histogram_window()
        if self.windowed and (hours.since, hours.until) != (self.filters.since, self.filters.until):
            span = " to ".join(
                moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "now"
                for moment in (hours.since, hours.until)
            )
            notes.append(
                f"Percentiles cover the window widened to whole hours ({span}): histograms "
                "are kept per hour."
            )
        if self.windowed:
            notes.append(
                "In a window, subjects, users and messages count those first seen in it; the "
                "sample-ratio check counts each subject once, in the slot it was assigned to."
            )
        notes.append(
            "Messages (distinct client request ids) are exact within a calendar month (UTC): "
            "an id reused in another month counts again."
        )
        notes.append(
            "Feedback counts each rating once, on the checkpoint that served the rated "
            "request (for a retried id, its latest successful attempt), and in a window by "
            "the time of that request, not when the feedback was given; feedback whose "
            "request is unknown counts nowhere until it arrives. Share positive: 95% Wilson "
            "score interval."
        )
        notes.append(f"Errors by kind: {ERROR_CATEGORY_MEANING}")
        if any(c.errors_by_kind.get(UNCLASSIFIED) for c in self.checkpoints):
            notes.append(
                "Unclassified errors were recorded before error categories were; their "
                "answers' finish reasons count as unknown."
            )
        notes.append(FINISH_REASON_MEANING)
        notes.append(
            "Throughput: output tokens per second after the first byte, per request that "
            "reported output tokens (percentiles from histograms, as latency)."
        )
        notes.append(
            f"Comparisons: {METHOD_REFERENCE}. Each request counts as one observation "
            "(a subject's requests are not independent, so with many requests per subject "
            "the intervals are narrower than they should be)."
        )
        if self.comparisons.all_checkpoints:
            notes.append(
                "Every checkpoint is compared with the control's current checkpoint, "
                "including checkpoints that served at other times: those differences also "
                "carry whatever changed between the periods."
            )
        series = self.timeseries
        if self.total_requests and series.buckets:
            notes.append(
                f"Requests over time: one step per {bucket_name(series.bucket_seconds)} "
                f"({len(series.buckets)} buckets, chosen for the span shown); each "
                "checkpoint's line runs only while it served its slot."
            )
        return notes

    def _buckets_read(self) -> str:
        """Which stored resolutions the window's counts were read from."""
        since, until = self.filters.epochs
        if since is None and until is None:
            return ", all-time rows"
        sizes = {size for size, _, _ in bucket_ranges(since, until)}
        names = [name for size, name in _RESOLUTION_NAMES if size in sizes]
        return f", whole {' and '.join(names)} buckets" if names else ""


_RESOLUTION_NAMES = ((86400, "day"), (3600, "hour"), (60, "minute"))


def database_name() -> str:
    """The database behind the default connection, as staff would name it."""
    if connection.vendor == "postgresql":
        version = connection.pg_version  # e.g. 160004
        return f"PostgreSQL {version // 10000}.{version % 10000}"
    if connection.vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    return connection.display_name


def current_checkpoints(slots: list[SlotStats], now: datetime) -> dict:
    """slot id -> the checkpoint it serves at ``now`` (a scheduled one is not current yet)."""
    current = {}
    for slot in slots:
        serving = [c for c in slot.checkpoints if c.effective_from <= now]
        if serving:
            current[slot.slot_id] = serving[-1]
    return current


def experiment_report(
    experiment: Experiment, filters: ReportFilters | None = None, *, all_checkpoints: bool = False
) -> ExperimentReport:
    filters = (filters or ReportFilters()).aligned()
    now = timezone.now()
    slots = [SlotStats.of(slot) for slot in slot_histories(experiment)]
    by_version = {c.version_id: c for slot in slots for c in slot.checkpoints}
    if by_version:
        fill_figures(by_version, filters)
    for slot in slots:
        slot.distinct_subjects = sum(c.new_slot_subjects for c in slot.checkpoints)
    total = sum(slot.distinct_subjects for slot in slots)
    for slot in slots:
        slot.observed_share = slot.distinct_subjects / total if total else None
    checkpoints = list(by_version.values())
    return ExperimentReport(
        experiment=experiment,
        filters=filters,
        slots=slots,
        srm=sample_ratio_check(slots),
        comparisons=compare_to_control(
            slots, current=current_checkpoints(slots, now), all_checkpoints=all_checkpoints
        ),
        timeseries=timeseries(checkpoints, filters, now),
        generated_at=now,
        database=database_name(),
    )
