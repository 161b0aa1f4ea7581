"""Several gateway processes add to the rollups of the same checkpoint and minute at
once: none waits for another's row locks (each adds to rows of its own writer id)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace

import pytest
from django.db import OperationalError, connection, transaction

from experiments.reports.report import experiment_report
from gateway.usage import DatabaseUnreachable
from tests.conftest import requires_postgres
from tests.report_seed import insert_requests, seed_experiment

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def same_minute_batch(seeded, *, new_subjects: int, tag: str):
    """Requests of known subjects plus new ones, all on one checkpoint in one minute."""
    model = seeded.requests[-1]
    batch = [
        replace(
            row, usage_id=uuid.uuid4(), created_at=model.created_at, version_id=model.version_id
        )
        for row in seeded.requests[-20:]
        if row.slot_label == model.slot_label
    ]
    batch += [
        replace(
            model,
            usage_id=uuid.uuid4(),
            subject_hash=uuid.uuid4().hex * 2,
            client_request_id=f"{tag}-{index}",
        )
        for index in range(new_subjects)
    ]
    return batch


def write_while_another_writer_holds_its_transaction(seeded, first_writer, second_writer):
    """The first writer's transaction stays open while the second writes (lock_timeout 1s)."""
    public_id = seeded.experiment.public_model_id
    held, released = threading.Event(), threading.Event()
    first = same_minute_batch(seeded, new_subjects=5, tag="first")
    second = same_minute_batch(seeded, new_subjects=5, tag="second")

    def hold_open():
        try:
            with transaction.atomic():
                insert_requests(first, public_model_id=public_id, writer=first_writer)
                held.set()
                released.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_open)
    holder.start()
    try:
        assert held.wait(30)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '1s'")
            insert_requests(second, public_model_id=public_id, writer=second_writer)
    finally:
        released.set()
        holder.join(30)
    return len(first) + len(second)


def test_two_writers_add_to_the_same_checkpoint_and_minute_without_waiting():
    seeded = seed_experiment(subjects=40, requests=200)
    before = experiment_report(seeded.experiment).total_requests
    added = write_while_another_writer_holds_its_transaction(seeded, 101, 102)
    assert experiment_report(seeded.experiment).total_requests == before + added


def test_writers_sharing_an_id_would_wait_for_each_other():
    # Why writer ids exist: the same rollup rows, updated by two open transactions.
    seeded = seed_experiment(subjects=40, requests=200)
    with pytest.raises(DatabaseUnreachable) as waited:
        write_while_another_writer_holds_its_transaction(seeded, 101, 101)
    assert isinstance(waited.value.__cause__, OperationalError)
    assert "lock timeout" in str(waited.value.__cause__)
