"""The report's queries spread over several connections reading one exported snapshot.

These tests commit their rows (``transaction=True``): other connections cannot see
rows of an open test transaction, and inside one the report runs sequentially.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import asdict

import pytest
from django.db import transaction

from experiments import reports
from experiments.reports import ReportFilters, experiment_report
from tests.conftest import requires_postgres
from tests.report_seed import seed_experiment

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def worker_threads(monkeypatch) -> list[str]:
    """Names of the threads that ran report queries on a connection of their own."""
    seen: list[str] = []
    original = reports._run_in_snapshot

    def spy(snapshot, jobs):
        seen.append(threading.current_thread().name)
        return original(snapshot, jobs)

    monkeypatch.setattr(reports, "_run_in_snapshot", spy)
    return seen


def _figures(report) -> dict:
    return {
        "checkpoints": [asdict(c) for c in report.checkpoints],
        "slots": [(s.slot_id, s.distinct_subjects) for s in report.slots],
        "srm": (report.srm.chi_square, report.srm.p_value),
        "series": (report.timeseries.buckets, report.timeseries.counts),
    }


def test_concurrent_report_matches_raw_rows(worker_threads):
    seeded = seed_experiment(subjects=90, requests=400)
    report = experiment_report(seeded.experiment)
    assert worker_threads, "the queries did not run on a second connection"
    rows_by_version = defaultdict(list)
    for row in seeded.requests:
        rows_by_version[row.version_id].append(row)
    for checkpoint in report.checkpoints:
        rows = rows_by_version[checkpoint.version_id]
        assert checkpoint.requests == len(rows)
        assert checkpoint.errors == sum(r.has_error for r in rows)
        assert checkpoint.distinct_subjects == len({r.subject_hash for r in rows})
        assert checkpoint.distinct_messages == len(
            {r.client_request_id for r in rows if r.client_request_id}
        )
        assert sum(report.timeseries.counts[checkpoint.version_id]) == len(rows)


@pytest.mark.parametrize("subject_kind", [None, "machine"])
def test_concurrent_and_sequential_reports_agree(worker_threads, subject_kind):
    seeded = seed_experiment(subjects=60, requests=240)
    filters = ReportFilters(subject_kind=subject_kind)
    concurrent = experiment_report(seeded.experiment, filters)
    assert worker_threads
    with transaction.atomic():  # inside a transaction: one connection, in order
        sequential = experiment_report(seeded.experiment, filters)
    assert len(worker_threads) == 1
    assert _figures(concurrent) == _figures(sequential)
