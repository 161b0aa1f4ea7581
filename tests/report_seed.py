"""A seeded experiment with a hot-swap, for the report tests.

Rows are built in memory first (``SeededRequest``) so tests can compute the
expected figures from them independently of the reports under test; they are
written through the gateway's own writer code (``record_rows``, ``write_rows``):
usage and attribution rows and their rollups, in one transaction.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone

from experiments.models import AllocationSubject, Experiment, VariantVersion
from experiments.prompts.store import capture_prompt
from experiments.reports import rollups
from gateway.spool import Spool
from gateway.usage import Attribution, UsageRecord, record_rows, write_rows
from tests.factories import (
    ExperimentFactory,
    VariantFactory,
    VariantVersionFactory,
    upstream_config,
)

#: Errors as the gateway records them, (status, error_kind), with the category a person
#: reads for each: written out here, independently of experiments.quality.
SEEDED_ERRORS = (
    (500, "upstream_http_500", "upstream_5xx"),
    (503, "upstream_http_503", "upstream_5xx"),
    (502, "upstream_unreachable", "upstream_5xx"),
    (200, "upstream_stream_cut", "upstream_5xx"),
    (401, "upstream_http_401", "auth"),
    (403, "upstream_http_403", "auth"),
    (429, "upstream_http_429", "rate_limit"),
    (504, "upstream_timeout", "timeout"),
    (499, "client_disconnected", "client_disconnect"),
    (400, "upstream_http_400", "bad_request"),
    (422, "upstream_http_422", "bad_request"),
    (400, "invalid_type", "bad_request"),
    (500, "internal_error", "other"),
    (404, "upstream_http_404", "other"),
)
#: Finish reasons as the gateway records them (None: the answer reported none).
SEEDED_FINISHES = ("stop", "stop", "stop", "length", "tool_calls", "content_filter", "other", None)


#: Written out, not imported: the figures' keys are part of the report's contract.
CATEGORIES = (
    "auth",
    "rate_limit",
    "upstream_5xx",
    "timeout",
    "client_disconnect",
    "bad_request",
    "other",
)
FINISHES = ("stop", "length", "tool_calls", "content_filter", "other", "unknown")


@dataclass
class SeededRequest:
    usage_id: uuid.UUID
    created_at: datetime
    version_id: uuid.UUID
    slot_label: str
    subject_kind: str
    subject_hash: str
    user_id: int | None
    client_request_id: str | None
    has_error: bool
    error_kind: str | None
    #: The error category expected for this row (SEEDED_ERRORS), None without error.
    error_category: str | None
    #: Recorded finish reason (errors have one too when their answer said one).
    finish_reason: str | None
    status_code: int
    is_stream: bool
    ttfb_ms: int | None
    total_ms: int
    input_tokens: int
    output_tokens: int
    body_sha256: str


@dataclass
class SeededExperiment:
    experiment: Experiment
    versions: dict[str, VariantVersion]  # "a1", "a2" (after the swap), "b1"
    swap_at: datetime
    start: datetime
    requests: list[SeededRequest]


def seed_experiment(
    *,
    subjects: int = 200,
    requests: int = 600,
    share_of_slot_a: float = 0.5,
    api_key: str = "sk-test-partner-key",
    seed: int = 7,
    start: datetime | None = None,
    writers: int = 1,
    prompts: Callable[[int], dict] | None = None,
) -> SeededExperiment:
    """Two equal-weight slots; slot-a hot-swaps from a1 to a2 half-way through.

    ``share_of_slot_a`` is the fraction of subjects placed in slot-a (0.5 is a
    balanced split; anything far from it is a sample-ratio mismatch). With
    ``writers`` > 1 the rows land as several gateway processes would write them:
    in that many batches of their own writer id, the batches out of time order.
    With ``prompts``, request ``index`` sends ``prompts(index)``, kept in the configured
    prompt store as the gateway keeps it (else its hash names no stored body).
    """
    rng = random.Random(seed)
    start = start or (timezone.now() - timedelta(hours=2)).replace(microsecond=0)
    swap_at = start + timedelta(minutes=60)
    experiment = ExperimentFactory(status="active", started_at=start - timedelta(days=1))
    slot_a = VariantFactory(experiment=experiment, label="slot-a", weight=1)
    slot_b = VariantFactory(experiment=experiment, label="slot-b", weight=1)
    versions = {
        "a1": VariantVersionFactory(
            variant=slot_a,
            upstream=upstream_config(internal_id="rc-alpha-1"),
            effective_at=start - timedelta(days=1),
            api_key=api_key,
        ),
        "b1": VariantVersionFactory(
            variant=slot_b,
            upstream=upstream_config(internal_id="rc-bravo-1"),
            effective_at=start - timedelta(days=1),
            api_key=api_key,
        ),
        "a2": VariantVersionFactory(
            variant=slot_a,
            upstream=upstream_config(internal_id="rc-alpha-2"),
            effective_at=swap_at,
            api_key=api_key,
        ),
    }
    kinds = [AllocationSubject.USER, AllocationSubject.MACHINE, AllocationSubject.IP]
    in_slot_a = round(subjects * share_of_slot_a)
    subject_slot = ["slot-a" if index < in_slot_a else "slot-b" for index in range(subjects)]
    subject_kind = [kinds[index % 3] for index in range(subjects)]
    # As the gateway allocates: a user subject is one user (so its pseudonym is
    # a function of the user id), a machine subject a machine id, an ip one IP.
    # Plain rows: password hashing would dominate the test time.
    user_subjects = [i for i in range(subjects) if subject_kind[i] == AllocationSubject.USER]
    created_users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"subject-{uuid.uuid4().hex[:12]}") for _ in user_subjects]
    )
    user_of_subject = {i: user.pk for i, user in zip(user_subjects, created_users, strict=True)}
    subject_value = {
        i: str(user_of_subject[i])
        if subject_kind[i] == AllocationSubject.USER
        else (
            f"machine-{i}"
            if subject_kind[i] == AllocationSubject.MACHINE
            else f"10.0.{i // 250}.{i % 250}"
        )
        for i in range(subjects)
    }
    rows = []
    errors_seeded = 0
    for index in range(requests):
        subject = index % subjects if index < subjects else rng.randrange(subjects)
        created_at = start + timedelta(seconds=index * 7200 // requests)
        slot = subject_slot[subject]
        if slot == "slot-a":
            version = versions["a1"] if created_at < swap_at else versions["a2"]
            error_probability = 0.05 if version is versions["a1"] else 0.2
        else:
            version = versions["b1"]
            error_probability = 0.1
        has_error = rng.random() < error_probability
        # Errors take each kind in turn: every category occurs in any sizeable seed.
        status, error_kind, category = (
            SEEDED_ERRORS[errors_seeded % len(SEEDED_ERRORS)] if has_error else (200, None, None)
        )
        errors_seeded += has_error
        # Slot b's checkpoint calls tools more often: the figures differ by checkpoint.
        finishes = SEEDED_FINISHES + (("tool_calls",) * 4 if slot == "slot-b" else ())
        kind = subject_kind[subject]
        rows.append(
            SeededRequest(
                usage_id=uuid.uuid4(),
                created_at=created_at,
                version_id=version.pk,
                slot_label=slot,
                subject_kind=kind,
                subject_hash=hashlib.sha256(
                    f"model_exp_{experiment.pk}_{kind}_{subject_value[subject]}".encode()
                ).hexdigest(),
                user_id=user_of_subject.get(subject),
                # Some retries share an id; some clients send none.
                client_request_id=None if index % 10 == 0 else f"msg-{index // 2}",
                has_error=has_error,
                error_kind=error_kind,
                error_category=category,
                finish_reason=rng.choice(finishes),
                status_code=status,
                is_stream=index % 4 == 0,
                ttfb_ms=None if index % 17 == 0 else rng.randint(20, 900),
                total_ms=rng.randint(100, 5000),
                input_tokens=rng.randint(1, 500),
                output_tokens=rng.randint(1, 800),
                body_sha256=capture_prompt(prompts(index))[0]
                if prompts
                else hashlib.sha256(f"body-{index}".encode()).hexdigest(),
            )
        )
    batches = [rows[index::writers] for index in range(writers)]
    rng.shuffle(batches)
    for writer, batch in enumerate(batches, start=1):
        insert_requests(batch, public_model_id=experiment.public_model_id, writer=writer)
    return SeededExperiment(experiment, versions, swap_at, start, rows)


def usage_record(row: SeededRequest, public_model_id: str) -> UsageRecord:
    """The record the gateway's view would have handed its writer for this request."""
    return UsageRecord(
        id=row.usage_id,
        created_at=row.created_at,
        user_id=row.user_id,
        public_model_id=public_model_id,
        request_kind="chat_completions",
        is_stream=row.is_stream,
        status_code=row.status_code,
        has_error=row.has_error,
        error_kind=row.error_kind,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        finish_reason=row.finish_reason,
        ttfb_ms=row.ttfb_ms,
        total_ms=row.total_ms,
        attribution=Attribution(
            version_id=str(row.version_id),
            allocation_subject=row.subject_kind,
            client_request_id=row.client_request_id,
            # Stored as the gateway stores it: the first 16 bytes, as a uuid.
            allocation_subject_hash=uuid.UUID(row.subject_hash[:32]),
            upstream_body=None,  # the prompt is not captured again: its hash is given
        ),
    )


def insert_requests(
    rows: list[SeededRequest], *, public_model_id: str, writer: int | None = None
) -> list[SeededRequest]:
    """Write rows as the gateway's usage writer does (usage and attribution rows and
    their rollups, in one transaction), as ``writer`` (default: this process's id).
    Returns the rows that were new."""
    batch = [
        record_rows(usage_record(row, public_model_id).spool_entry(), (row.body_sha256, False))
        for row in rows
    ]
    previous, rollups.WRITER = rollups.WRITER, writer or rollups.WRITER
    try:
        with tempfile.TemporaryDirectory() as quarantine:
            written = write_rows(batch, Spool(quarantine, 10**9, 1.0))
    finally:
        rollups.WRITER = previous
    new = {written_rows.usage["id"] for written_rows in written}
    return [row for row in rows if row.usage_id in new]
