"""Prompt wipe and garbage collection: the writes behind ``manage.py prompts``.

GC safety (see also the layout notes in ``experiments.prompts.store``):

* A blob younger than the grace period is never deleted, so a write in flight
  (parts → manifest → row) is safe.
* A request blob is live when a row references it; a part is live when a live
  manifest references it; an answer blob is live when a row's ``response_sha256``
  references it. Manifests that are themselves garbage do not keep
  their parts alive, so one run collects both.
* The store refreshes the age of a blob it reuses, and GC re-reads a
  candidate's age right before deleting it: a blob that became referenced
  again during the run is young again and kept, and so are the parts of a
  request blob kept that way (request candidates are handled before parts).
  GC stops deleting if it runs longer than the grace period minus the store's
  part-touch TTL, the window in which that argument holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    Experiment,
    ExperimentRequest,
)
from experiments.prompts.store import (
    ANSWER_NAMESPACE,
    PART_NAMESPACE,
    PART_TOUCH_TTL_SECONDS,
    REQUEST_NAMESPACE,
    BlobInfo,
    PromptStore,
    is_sha256_hex,
    manifest_part_digests,
)

#: Shorter graces would let GC take a part a writer skipped as recently touched.
MIN_GRACE = timedelta(seconds=2 * PART_TOUCH_TTL_SECONDS)
DEFAULT_GRACE = timedelta(minutes=60)

#: Progress callback: (phase, done, total).
ProgressCallback = Callable[[str, int, int], None]


# --- Wipe --------------------------------------------------------------------


@dataclass(frozen=True)
class WipeResult:
    wiped: int
    already_deleted: int
    failed_left: int
    #: Captured answers wiped with the prompts (SPEC §9: answers live with prompts).
    answers_wiped: int = 0


def _experiment_rows(experiment: Experiment, before: datetime | None):
    rows = ExperimentRequest.objects.filter(variant_version__variant__experiment=experiment)
    return rows.filter(created_at__lt=before) if before is not None else rows


def _answer_rows(rows):
    return rows.filter(response_sha256__isnull=False).exclude(response_sha256=PROMPT_HASH_DELETED)


def count_wipeable(*, experiment: Experiment, before: datetime | None = None) -> int:
    """Rows with a stored prompt or a captured answer (or a failed answer capture) to wipe."""
    rows = _experiment_rows(experiment, before)
    return (
        rows.exclude(request_body_sha256__in=[PROMPT_HASH_DELETED, PROMPT_HASH_FAILED])
        | _answer_rows(rows)
    ).count()


def wipe_prompts(*, experiment: Experiment, before: datetime | None = None) -> WipeResult:
    """Replace the prompt hashes of an experiment's rows with ``__deleted__``.

    Only the hash column changes: attribution (checkpoint, subject, tokens) stays.
    ``__failed__`` rows hold no prompt and keep saying why. The blobs go at the
    next GC unless another row still references the same content.
    """
    rows = _experiment_rows(experiment, before)
    with transaction.atomic():
        already_deleted = rows.filter(request_body_sha256=PROMPT_HASH_DELETED).count()
        failed_left = rows.filter(request_body_sha256=PROMPT_HASH_FAILED).count()
        wiped = rows.exclude(
            request_body_sha256__in=[PROMPT_HASH_DELETED, PROMPT_HASH_FAILED]
        ).update(request_body_sha256=PROMPT_HASH_DELETED)
        # A captured answer goes with its prompt; a failed capture says nothing any more
        # once the prompt is gone, so it becomes __deleted__ too.
        answers_wiped = _answer_rows(rows).update(response_sha256=PROMPT_HASH_DELETED)
    return WipeResult(
        wiped=wiped,
        already_deleted=already_deleted,
        failed_left=failed_left,
        answers_wiped=answers_wiped,
    )


# --- Garbage collection ------------------------------------------------------


@dataclass
class Tally:
    count: int = 0
    bytes: int = 0

    def add(self, blob: BlobInfo) -> None:
        self.count += 1
        self.bytes += blob.size


@dataclass
class GcSummary:
    dry_run: bool
    kept_referenced: dict[str, Tally] = field(default_factory=dict)
    kept_young: dict[str, Tally] = field(default_factory=dict)
    removed: dict[str, Tally] = field(default_factory=dict)
    #: Candidates that were touched or vanished between the scan and the delete.
    skipped_changed: int = 0
    #: Live manifests that could not be read; kept, their parts may be collected.
    unreadable_manifests: int = 0
    #: Hashes referenced by rows with no blob in the store.
    missing_referenced: int = 0
    stopped_early: bool = False

    def _tally(self, bucket: dict[str, Tally], kind: str) -> Tally:
        return bucket.setdefault(kind, Tally())


def _kind(blob: BlobInfo) -> str:
    if not is_sha256_hex(blob.sha256):
        return "temp"
    if blob.namespace == ANSWER_NAMESPACE:
        return "answer"
    return "request" if blob.namespace == REQUEST_NAMESPACE else "part"


def _referenced_request_digests() -> set[bytes]:
    # 32-byte digests rather than hex strings: half the memory on big tables.
    hashes = (
        ExperimentRequest.objects.exclude(
            request_body_sha256__in=[PROMPT_HASH_DELETED, PROMPT_HASH_FAILED]
        )
        .values_list("request_body_sha256", flat=True)
        .distinct()
    )
    return {bytes.fromhex(value) for value in hashes.iterator(chunk_size=10_000)}


def _referenced_answer_digests() -> set[bytes]:
    hashes = (
        ExperimentRequest.objects.filter(response_sha256__isnull=False)
        .exclude(response_sha256__in=[PROMPT_HASH_DELETED, PROMPT_HASH_FAILED])
        .values_list("response_sha256", flat=True)
        .distinct()
    )
    return {bytes.fromhex(value) for value in hashes.iterator(chunk_size=10_000)}


def _parts_of(backend, key: str) -> set[str]:
    try:
        return manifest_part_digests(backend.read(key))
    except (KeyError, ValueError):
        return set()


def collect_garbage(
    store: PromptStore,
    *,
    grace: timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    now: datetime | None = None,
    progress: ProgressCallback | None = None,
) -> GcSummary:
    """Delete blobs no row and no live manifest references and older than ``grace``."""
    if grace < MIN_GRACE:
        raise ValueError(f"the grace period must be at least {MIN_GRACE}")
    started = time.monotonic()
    deadline = started + (grace.total_seconds() - PART_TOUCH_TTL_SECONDS)
    cutoff = (now or timezone.now()) - grace
    backend = store.backend
    summary = GcSummary(dry_run=dry_run)
    report = progress or (lambda phase, done, total: None)

    # List before reading rows: a blob written after the listing is not a candidate,
    # and a row committed before it is seen.
    request_blobs = list(backend.list(REQUEST_NAMESPACE))
    part_blobs = list(backend.list(PART_NAMESPACE))
    answer_blobs = list(backend.list(ANSWER_NAMESPACE))
    referenced = _referenced_request_digests()
    referenced_answers = _referenced_answer_digests()
    total = len(request_blobs) + len(part_blobs) + len(answer_blobs)

    candidates: list[BlobInfo] = []
    live_parts: set[str] = set()
    stored_requests: set[bytes] = set()
    for done, blob in enumerate(request_blobs, start=1):
        kind = _kind(blob)
        is_referenced = kind == "request" and bytes.fromhex(blob.sha256) in referenced
        if kind == "request":
            stored_requests.add(bytes.fromhex(blob.sha256))
        if is_referenced or blob.modified > cutoff:
            bucket = summary.kept_referenced if is_referenced else summary.kept_young
            summary._tally(bucket, kind).add(blob)
            if kind == "request":
                try:
                    live_parts |= manifest_part_digests(backend.read(blob.key))
                except KeyError:
                    pass  # deleted meanwhile: nothing to keep alive
                except ValueError:
                    summary.unreadable_manifests += 1
        else:
            candidates.append(blob)
        report("scan", done, total)
    summary.missing_referenced = len(referenced - stored_requests)

    for done, blob in enumerate(part_blobs, start=len(request_blobs) + 1):
        kind = _kind(blob)
        if kind == "part" and blob.sha256 in live_parts:
            summary._tally(summary.kept_referenced, kind).add(blob)
        elif blob.modified > cutoff:
            summary._tally(summary.kept_young, kind).add(blob)
        else:
            candidates.append(blob)
        report("scan", done, total)

    # Answers: whole blobs, live while a row references them.
    stored_answers: set[bytes] = set()
    for done, blob in enumerate(answer_blobs, start=len(request_blobs) + len(part_blobs) + 1):
        kind = _kind(blob)
        is_referenced = kind == "answer" and bytes.fromhex(blob.sha256) in referenced_answers
        if kind == "answer":
            stored_answers.add(bytes.fromhex(blob.sha256))
        if is_referenced or blob.modified > cutoff:
            bucket = summary.kept_referenced if is_referenced else summary.kept_young
            summary._tally(bucket, kind).add(blob)
        else:
            candidates.append(blob)
        report("scan", done, total)
    summary.missing_referenced += len(referenced_answers - stored_answers)

    # Request blobs come first in ``candidates``: a crash half-way never leaves a
    # manifest pointing at a part this run deleted.
    rescued_parts: set[str] = set()
    for done, blob in enumerate(candidates, start=1):
        if not dry_run:
            if time.monotonic() > deadline:
                summary.stopped_early = True
                break
            kind = _kind(blob)
            modified = backend.modified(blob.key)
            if modified is None or modified > cutoff or blob.sha256 in rescued_parts:
                # Reused since the scan: a writer that finds a request blob touches
                # only that blob, so its parts must be spared here too.
                summary.skipped_changed += 1
                if kind == "request" and modified is not None:
                    rescued_parts |= _parts_of(backend, blob.key)
                report("delete", done, len(candidates))
                continue
            backend.delete(blob.key)
        summary._tally(summary.removed, _kind(blob)).add(blob)
        report("delete", done, len(candidates))
    return summary
