"""The request browser: attributed requests newest first, keyset-paginated, and one
request's detail. Reads raw attribution rows a page at a time through the
(variant_version, created_at, usage_id) indexes, never a whole table.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from heapq import merge
from itertools import islice

from django.db.models import Q
from django.utils import timezone

from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    Experiment,
    ExperimentRequest,
)
from experiments.reports.filters import BrowserFilters, ReportInputError
from experiments.selectors import VersionIdentity, version_labels

BROWSER_PAGE_SIZE = 50

BROWSER_COLUMNS = (
    "usage_id",
    "created_at",
    "variant_version_id",
    "allocation_subject",
    "client_request_id",
    "request_kind",
    "request_body_sha256",
    "was_truncated",
    "response_sha256",
    "status_code",
    "has_error",
    "input_tokens",
    "output_tokens",
    "ttfb_ms",
    "total_ms",
)
#: What only a request's own page shows (the list stays on the browser's columns).
DETAIL_COLUMNS = (*BROWSER_COLUMNS, "error_kind", "error_category", "finish_reason")


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
    response_sha256: str | None
    status_code: int
    has_error: bool
    input_tokens: int
    output_tokens: int
    ttfb_ms: int | None
    total_ms: int | None
    #: ``rc1 v2``, ``rc1 v2.1 · key rotated`` (selectors.VersionIdentity.label)
    checkpoint_label: str = ""
    #: Read for a request's own page only (``DETAIL_COLUMNS``).
    error_kind: str | None = None
    error_category: str | None = None
    finish_reason: str | None = None


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


def to_row(values: dict, labels: dict[uuid.UUID, VersionIdentity]) -> RequestRow:
    identity = labels[values["variant_version_id"]]
    slot_label, internal_id = identity.slot_label, identity.internal_id
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
        response_sha256=values["response_sha256"],
        status_code=values["status_code"],
        has_error=values["has_error"],
        input_tokens=values["input_tokens"],
        output_tokens=values["output_tokens"],
        ttfb_ms=values["ttfb_ms"],
        total_ms=values["total_ms"],
        checkpoint_label=identity.label,
        error_kind=values.get("error_kind"),
        error_category=values.get("error_category"),
        finish_reason=values.get("finish_reason"),
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
    labels = version_labels(experiment)
    version_ids = [
        version_id
        for version_id, identity in labels.items()
        if (filters.slot is None or identity.slot_id == filters.slot)
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
                queryset.order_by("-created_at", "-usage_id").values(*BROWSER_COLUMNS)[
                    : page_size + 1
                ]
            )
        )
    newest_first = merge(
        *per_version, key=lambda row: (row["created_at"], row["usage_id"]), reverse=True
    )
    page = list(islice(newest_first, page_size + 1))
    rows = [to_row(values, labels) for values in page[:page_size]]
    next_cursor = None
    if len(page) > page_size:
        last = rows[-1]
        next_cursor = encode_cursor(last.created_at, last.usage_id)
    return RequestPage(rows=rows, next_cursor=next_cursor)


def request_detail(experiment: Experiment, usage_id: uuid.UUID) -> RequestRow | None:
    labels = version_labels(experiment)
    values = (
        ExperimentRequest.objects.filter(usage_id=usage_id, variant_version_id__in=list(labels))
        .values(*DETAIL_COLUMNS)
        .first()
    )
    return to_row(values, labels) if values else None


#: The compare view reads at most this many captured answers to one prompt.
COMPARE_LIMIT = 50


def _answered(experiment: Experiment, prompt_sha256: str, labels: dict):
    """Rows of this experiment with this prompt and a stored answer: read through the
    partial index ``mx_request_prompt_answered`` (prompt hash, newest first)."""
    return (
        ExperimentRequest.objects.filter(
            request_body_sha256=prompt_sha256,
            response_sha256__isnull=False,
            variant_version_id__in=list(labels),
        )
        .exclude(response_sha256__in=[PROMPT_HASH_FAILED, PROMPT_HASH_DELETED])
        .order_by("-created_at")
    )


def has_answered_siblings(experiment: Experiment, row: RequestRow) -> bool:
    """Whether another request of this experiment sent the same prompt and has an answer."""
    if row.request_body_sha256 in (PROMPT_HASH_FAILED, PROMPT_HASH_DELETED):
        return False
    labels = version_labels(experiment)
    return (
        _answered(experiment, row.request_body_sha256, labels)
        .exclude(usage_id=row.usage_id)[:1]
        .exists()
    )


def answered_requests(
    experiment: Experiment, prompt_sha256: str, *, limit: int = COMPARE_LIMIT
) -> tuple[list[RequestRow], bool]:
    """The newest ``limit`` requests with this prompt and a captured answer, and whether
    there were more."""
    labels = version_labels(experiment)
    values = list(
        _answered(experiment, prompt_sha256, labels).values(*BROWSER_COLUMNS)[: limit + 1]
    )
    return [to_row(v, labels) for v in values[:limit]], len(values) > limit
