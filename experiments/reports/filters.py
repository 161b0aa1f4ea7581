"""What a report or the request browser is asked for, checked once, rendered once.

``ReportFilters`` select rollup rows (``rollup_q``): a window is cut into the fewest
whole buckets of each resolution (days in the middle, hours and minutes at the
edges), so a report reads at most a few hundred rows per checkpoint and subject kind
whatever the traffic. Rollups are per minute: a window edge inside a minute is moved
out to the minute's boundary, and the report says so (``widened``).

``BrowserFilters`` select attribution rows (``q``) for the request browser, which
pages through raw rows by index.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from django.db.models import Q
from django.utils import timezone

from experiments.models import AllocationSubject, RollupResolution


class ReportInputError(ValueError):
    """A bad filter or cursor. The message is safe to show."""


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


_MINUTE = int(RollupResolution.MINUTE)
_HOUR = int(RollupResolution.HOUR)
#: Coarsest first: a window takes whole days, then whole hours, then minutes.
_LEVELS = (int(RollupResolution.DAY), int(RollupResolution.HOUR), _MINUTE)


def _floor(epoch: int, size: int) -> int:
    return epoch - epoch % size


def _ceil(epoch: int, size: int) -> int:
    return -_floor(-epoch, size)


def bucket_ranges(
    since: int | None, until: int | None, levels: tuple[int, ...] = _LEVELS
) -> list[tuple[int, int | None, int | None]]:
    """``[since, until)`` (epoch seconds on minute boundaries; None: unbounded) as
    (resolution, first bucket, end) ranges of whole buckets, coarsest first."""
    if not levels or (since is not None and until is not None and since >= until):
        return []
    size = levels[0]
    first = _ceil(since, size) if since is not None else None
    end = _floor(until, size) if until is not None else None
    if first is not None and end is not None and first >= end:
        return bucket_ranges(since, until, levels[1:])
    ranges = [(size, first, end)]
    if since is not None and since < first:
        ranges += bucket_ranges(since, first, levels[1:])
    if until is not None and end < until:
        ranges += bucket_ranges(end, until, levels[1:])
    return ranges


def ranges_q(ranges: list[tuple[int, int | None, int | None]]) -> Q:
    """Rollup rows of the given bucket ranges (no range: no row)."""
    condition = Q(resolution__in=[])
    for resolution, first, end in ranges:
        part = Q(resolution=resolution)
        if first is not None:
            part &= Q(bucket__gte=first)
        if end is not None:
            part &= Q(bucket__lt=end)
        condition |= part
    return condition


@dataclass(frozen=True)
class ReportFilters:
    since: datetime | None = None
    until: datetime | None = None
    subject_kind: str | None = None
    #: Whether ``since``/``until`` were moved out to whole minutes (``aligned``).
    widened: bool = False

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

    def aligned(self, size: int = _MINUTE) -> ReportFilters:
        """The window moved out to whole buckets of ``size`` seconds (default minutes,
        the rollups' finest bucket)."""
        since, until = self.since, self.until
        if since is not None:
            since = datetime.fromtimestamp(_floor(int(since.timestamp() // 1), size), tz=UTC)
        if until is not None:
            exact = until.timestamp()
            until = datetime.fromtimestamp(_ceil(int(-(-exact // 1)), size), tz=UTC)
        widened = self.widened or since != self.since or until != self.until
        return replace(self, since=since, until=until, widened=widened)

    def histogram_window(self) -> ReportFilters:
        """The window percentiles cover: moved out to whole hours (histograms are kept
        per hour, day and all time)."""
        return self.aligned(_HOUR)

    def histogram_q(self) -> Q:
        """Histogram rows of ``histogram_window``."""
        window = self.histogram_window()
        if window.since is None and window.until is None:
            return window.rollup_q()
        return window.rollup_q(levels=(int(RollupResolution.DAY), _HOUR))

    @property
    def epochs(self) -> tuple[int | None, int | None]:
        """The (aligned) window in epoch seconds."""
        return (
            int(self.since.timestamp()) if self.since is not None else None,
            int(self.until.timestamp()) if self.until is not None else None,
        )

    def rollup_q(self, levels: tuple[int, ...] | None = None) -> Q:
        """Rollup rows of the (aligned) window and subject kind. Without a window, the
        all-time rows; ``levels`` limits the resolutions used (for a time series)."""
        since, until = self.epochs
        if since is None and until is None and levels is None:
            condition = Q(resolution=RollupResolution.ALL)
        else:
            condition = ranges_q(bucket_ranges(since, until, levels or _LEVELS))
        if self.subject_kind is not None:
            condition &= Q(allocation_subject=self.subject_kind)
        return condition

    def span_or(self, first: datetime | None, last: datetime | None, now: datetime):
        """The stretch a time series draws: a chosen window whole (an empty stretch is
        information); "all" from the first to the last request."""
        start = self.since or first or now - timedelta(hours=1)
        if self.until:
            end = self.until
        elif self.since or last is None:
            end = now
        else:
            end = last
        return start, max(end, start)


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
