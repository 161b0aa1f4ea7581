"""Feedback (SPEC §12): checked, stored, and joined to the checkpoint that served it.

One set of rules for every way feedback comes in (``POST /v1/feedback``, the admin's
CSV upload): ``check_feedback`` says in words what is wrong with an item, and
``record_feedback`` stores checked items, each joined at once if its request's
attribution row is already there.

The join. A client request id can have several attribution rows (a client retrying
with the same ``X-Kilo-Request``): the feedback rates the answer the user saw, so it
joins the **latest successful** row (``has_error`` false), or the latest row when none
succeeded; ties on time go to the greater usage id. Each feedback row records which row
it joined (``request_usage_id``, ``request_created_at``, ``request_ok``), so every path
applies the same rule and only ever moves a join to a row it prefers:

* at insert (``record_feedback``): the best row already committed;
* when attribution rows land (``join_landed``, called by the usage writer in the
  transaction that inserts them): one ``UPDATE`` for the batch's client request ids,
  only when the batch has any;
* ``rejoin`` (``rollups rebuild``, ``manage.py feedback rejoin``) recomputes from every
  attribution row still kept, and ``rejoin_recent`` (each usage writer, every few
  seconds) does so for feedback of the last minutes: that closes the one race the
  first two leave (feedback and its attribution row committed at the same moment, each
  transaction not seeing the other's row).

A join never goes back to none: attribution rows dropped by retention leave the
feedback joined (and counted) where it was.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from django.db import connection, transaction
from django.utils import timezone

from experiments.models import (
    ExperimentRequest,
    Feedback,
    FeedbackRating,
    FeedbackSource,
)

logger = logging.getLogger(__name__)

#: As long as an ``X-Kilo-Request`` the gateway stores (gateway.views).
MAX_CLIENT_REQUEST_ID_LENGTH = 512
MAX_COMMENT_LENGTH = 4000
RATINGS = tuple(r.value for r in FeedbackRating)
#: ``rejoin_recent`` looks at feedback created this recently.
RECENT = timedelta(minutes=5)
_CHUNK = 1000


@dataclass(frozen=True)
class FeedbackItem:
    client_request_id: str
    rating: str
    comment: str = ""


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def check_feedback(client_request_id: Any, rating: Any, comment: Any) -> tuple[FeedbackItem, list]:
    """The item these values make, and what is wrong with them (empty: nothing).

    The id is stripped of surrounding spaces (as the gateway stores ``X-Kilo-Request``)
    and the rating of spaces and case; the comment is kept as written.
    """
    problems = []
    if client_request_id is None or (
        isinstance(client_request_id, str) and not client_request_id.strip()
    ):
        problems.append("client_request_id is missing or empty.")
        client_request_id = ""
    elif not isinstance(client_request_id, str):
        problems.append("client_request_id must be a string.")
        client_request_id = ""
    else:
        client_request_id = client_request_id.strip()
        if len(client_request_id) > MAX_CLIENT_REQUEST_ID_LENGTH:
            problems.append(
                f"client_request_id is longer than {MAX_CLIENT_REQUEST_ID_LENGTH} characters."
            )
        elif not client_request_id.isprintable():
            problems.append(
                "client_request_id must be printable characters only (no control "
                "characters, line breaks or NUL)."
            )
    if not isinstance(rating, str) or rating.strip().lower() not in RATINGS:
        shown = repr(rating) if isinstance(rating, (str, int, float, bool)) else "missing"
        if isinstance(rating, str) and len(rating) > 20:
            shown = repr(rating[:20] + "…")
        problems.append(f'rating must be "up" or "down" (got {shown}).')
        rating = ""
    else:
        rating = rating.strip().lower()
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        problems.append("comment must be a string.")
        comment = ""
    elif len(comment) > MAX_COMMENT_LENGTH:
        problems.append(
            f"comment is {len(comment):,} characters long; at most {MAX_COMMENT_LENGTH:,} are kept."
        )
    elif "\x00" in comment:
        problems.append("comment must not contain NUL characters.")
    elif _has_surrogate(comment):
        problems.append("comment is not valid Unicode (a lone surrogate).")
    return FeedbackItem(client_request_id, rating, comment), problems


# --- the join ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """An attribution row a feedback row can join."""

    version_id: uuid.UUID
    usage_id: uuid.UUID
    created_at: datetime
    subject_kind: str
    ok: bool

    @property
    def preference(self) -> tuple:
        """Greater is preferred: successful first, then the latest, then the greater id."""
        return (self.ok, self.created_at, self.usage_id)

    def fields(self) -> dict[str, Any]:
        return {
            "variant_version_id": self.version_id,
            "request_usage_id": self.usage_id,
            "request_created_at": self.created_at,
            "request_allocation_subject": self.subject_kind,
            "request_ok": self.ok,
        }


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _best(rows: Iterable[Served], key) -> dict[str, Served]:
    best: dict[str, Served] = {}
    for served, client_request_id in zip(rows, key, strict=True):
        current = best.get(client_request_id)
        if current is None or served.preference > current.preference:
            best[client_request_id] = served
    return best


def served_by(client_request_ids: Sequence[str]) -> dict[str, Served]:
    """The preferred attribution row of each client request id that has one."""
    rows, keys = [], []
    unique = list(dict.fromkeys(client_request_ids))
    for start in range(0, len(unique), _CHUNK):
        for cid, version, usage, created_at, kind, has_error in ExperimentRequest.objects.filter(
            client_request_id__in=unique[start : start + _CHUNK]
        ).values_list(
            "client_request_id",
            "variant_version_id",
            "usage_id",
            "created_at",
            "allocation_subject",
            "has_error",
        ):
            rows.append(Served(_uuid(version), _uuid(usage), created_at, kind, not has_error))
            keys.append(cid)
    return _best(rows, keys)


def _current(feedback: Feedback) -> tuple | None:
    if feedback.variant_version_id is None:
        return None
    return (feedback.request_ok, feedback.request_created_at, _uuid(feedback.request_usage_id))


def _apply(feedback_rows: Iterable[Feedback], best: Mapping[str, Served]) -> int:
    """Move each row's join to its preferred attribution row where that is better."""
    changed = []
    for row in feedback_rows:
        served = best.get(row.client_request_id)
        if served is None:
            continue
        current = _current(row)
        if current is not None and served.preference <= current:
            continue
        for name, value in served.fields().items():
            setattr(row, name, value)
        changed.append(row)
    if changed:
        Feedback.objects.bulk_update(changed, _JOIN_FIELDS)
    return len(changed)


_JOIN_FIELDS = [
    "variant_version_id",
    "request_usage_id",
    "request_created_at",
    "request_allocation_subject",
    "request_ok",
]


def record_feedback(
    items: Sequence[FeedbackItem], *, source: str, submitted_by_id: int | None
) -> list[Feedback]:
    """Store checked items (all or none), each joined if its request is known."""
    if source not in FeedbackSource.values:
        raise ValueError(f"unknown feedback source {source!r}")
    now = timezone.now()
    with transaction.atomic():
        best = served_by([item.client_request_id for item in items])
        rows = []
        for item in items:
            row = Feedback(
                client_request_id=item.client_request_id,
                rating=item.rating,
                comment=item.comment,
                source=source,
                submitted_by_id=submitted_by_id,
                created_at=now,
            )
            served = best.get(item.client_request_id)
            if served is not None:
                for name, value in served.fields().items():
                    setattr(row, name, value)
            rows.append(row)
        Feedback.objects.bulk_create(rows, batch_size=_CHUNK)
    return rows


# --- when attribution rows land (the usage writer) ----------------------------------------

_LANDED_SQL = (
    "UPDATE model_experiment_feedback AS f SET variant_version_id = b.v, "
    "request_usage_id = b.u, request_created_at = b.t, request_allocation_subject = b.k, "
    "request_ok = b.ok FROM (SELECT r->>0 AS cid, (r->>1)::uuid AS v, (r->>2)::uuid AS u, "
    "(r->>3)::timestamptz AS t, r->>4 AS k, (r->>5)::boolean AS ok "
    "FROM jsonb_array_elements(%s::jsonb) AS r) AS b "
    "WHERE f.client_request_id = b.cid AND (f.variant_version_id IS NULL "
    "OR (b.ok, b.t, b.u) > (f.request_ok, f.request_created_at, f.request_usage_id))"
)


def join_landed(rows: Sequence[Mapping[str, Any]]) -> None:
    """Join feedback to attribution rows just inserted, in the writer's transaction.

    ``rows`` map ``ExperimentRequest`` attnames to values. Nothing is asked of the
    database unless a row carries a client request id; then one statement.
    """
    candidates = [
        (row["client_request_id"], row) for row in rows if row["client_request_id"] is not None
    ]
    if not candidates:
        return
    best = _best(
        (
            Served(
                _uuid(row["variant_version_id"]),
                _uuid(row["usage_id"]),
                row["created_at"],
                row["allocation_subject"],
                not row["has_error"],
            )
            for _, row in candidates
        ),
        [cid for cid, _ in candidates],
    )
    if connection.vendor != "postgresql":
        _apply(Feedback.objects.filter(client_request_id__in=list(best)), best)
        return
    batch = json.dumps(
        [
            [
                cid,
                served.version_id.hex,
                served.usage_id.hex,
                served.created_at.astimezone(UTC).isoformat(),
                served.subject_kind,
                served.ok,
            ]
            for cid, served in best.items()
        ],
        separators=(",", ":"),
    )
    connection.ensure_connection()
    # A server-binding cursor, as the rollups use: prepared once per connection.
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(_LANDED_SQL, (batch,))


# --- rejoin ------------------------------------------------------------------------------


def rejoin(*, since: datetime | None = None) -> tuple[int, int]:
    """Join feedback (all, or created since ``since``) to its preferred attribution row
    among those kept; returns (feedback rows looked at, joins changed)."""
    queryset = Feedback.objects.order_by("created_at", "id")
    if since is not None:
        queryset = queryset.filter(created_at__gte=since)
    looked = changed = 0
    last = None
    while True:
        page = queryset
        if last is not None:
            page = page.filter(created_at__gte=last[0]).exclude(created_at=last[0], id__lte=last[1])
        with transaction.atomic():
            # Locked before the attribution rows are read: a writer joining one of these
            # rows meanwhile has committed by then, so its better join is seen, not undone.
            rows = list(page.select_for_update(of=("self",))[:_CHUNK])
            if not rows:
                break
            best = served_by([row.client_request_id for row in rows])
            changed += _apply(rows, best)
        looked += len(rows)
        last = (rows[-1].created_at, rows[-1].id)
    return looked, changed


def rejoin_recent() -> int:
    """``rejoin`` of the feedback of the last ``RECENT`` minutes; returns joins changed."""
    return rejoin(since=timezone.now() - RECENT)[1]
