"""Raw tables at scale: monthly partitions on PostgreSQL, and retention that drops old
raw rows (and their prompts) while reports, rollups and the SRM stay exactly as they
were."""

from __future__ import annotations

import io
import json
import os
import time
from datetime import UTC, date, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from experiments.models import ExperimentRequest
from experiments.partitions import ensure_partitions, existing_partitions, month_start
from experiments.prompts.store import get_prompt_store
from experiments.reports.filters import ReportFilters
from experiments.reports.report import experiment_report
from gateway.models import GatewayUsage
from tests.conftest import requires_postgres
from tests.report_seed import insert_requests, seed_experiment

pytestmark = pytest.mark.django_db


def partition_of(table: str, key: str, value) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT tableoid::regclass::text FROM {table} WHERE {key} = %s",  # noqa: S608
            [value],
        )
        return cursor.fetchone()[0]


@requires_postgres
def test_raw_tables_are_partitioned_by_month():
    seeded = seed_experiment(subjects=5, requests=5)
    row = seeded.requests[0]
    month = f"{row.created_at.astimezone(UTC):%Y%m}"
    assert partition_of("gateway_usage", "id", row.usage_id) == f"gateway_usage_p{month}"
    assert (
        partition_of("model_experiment_request", "usage_id", row.usage_id)
        == f"model_experiment_request_p{month}"
    )


@requires_postgres
def test_a_row_of_a_month_without_a_partition_lands_in_the_default_partition():
    far = timezone.now().replace(microsecond=0) + timedelta(days=3 * 365)
    seeded = seed_experiment(subjects=4, requests=4, start=far)
    row = seeded.requests[0]
    assert partition_of("gateway_usage", "id", row.usage_id) == "gateway_usage_default"
    assert experiment_report(seeded.experiment).total_requests == 4


@requires_postgres
def test_ensure_creates_the_coming_months_and_leaves_a_month_the_default_holds():
    far = timezone.now().replace(microsecond=0) + timedelta(days=3 * 365)
    seed_experiment(subjects=2, requests=2, start=far)
    result = ensure_partitions(months_ahead=40)
    held = f"gateway_usage_p{far:%Y%m}"
    assert held in result.held_in_default and held not in result.created
    this_month = month_start(timezone.now().astimezone(UTC))
    assert this_month in existing_partitions("gateway_usage")
    assert ensure_partitions(months_ahead=40).created == []


def test_partitions_command_reports_what_it_created():
    out = io.StringIO()
    call_command("partitions", "ensure", "--months-ahead", "1", stdout=out)
    assert out.getvalue().startswith("Created ")


# --- retention ------------------------------------------------------------------------


def every_report(experiment, swap_at):
    filters = [
        ReportFilters(),
        ReportFilters(subject_kind="user"),
        ReportFilters(since=swap_at - timedelta(hours=1), until=swap_at + timedelta(hours=1)),
    ]
    figures = []
    for window in filters:
        report = experiment_report(experiment, window)
        figures.append(
            (
                [vars(c) for c in report.checkpoints],
                [(s.label, s.distinct_subjects) for s in report.slots],
                (report.srm.observed, report.srm.chi_square, report.srm.p_value),
                # Requests per bucket: an open window's chart gains empty buckets as time
                # passes between two reports.
                {
                    (version_id, report.timeseries.bucket_seconds, bucket): count
                    for version_id, counts in report.timeseries.counts.items()
                    for bucket, count in zip(report.timeseries.buckets, counts, strict=True)
                    if count
                },
            )
        )
    return figures


@pytest.fixture
def old_and_recent(settings, tmp_path):
    """An experiment with rows 150 days old and rows 2 hours old, each with a prompt."""
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    old_start = (timezone.now() - timedelta(days=150)).replace(microsecond=0)
    ensure_partitions(first_month=month_start(old_start))
    seeded = seed_experiment(subjects=40, requests=240, start=old_start)
    recent = [
        row.__class__(
            **{
                **vars(row),
                "usage_id": row.usage_id.__class__(int=row.usage_id.int ^ 1),
                "created_at": timezone.now().replace(microsecond=0) - timedelta(hours=2),
            }
        )
        for row in seeded.requests[:60]
    ]
    store = get_prompt_store()
    old_hash = store.put(json.dumps({"prompt": "old"}).encode())
    recent_hash = store.put(json.dumps({"prompt": "recent"}).encode())
    recent = [row.__class__(**{**vars(row), "body_sha256": recent_hash}) for row in recent]
    insert_requests(recent, public_model_id=seeded.experiment.public_model_id)
    ExperimentRequest.objects.filter(usage_id=seeded.requests[0].usage_id).update(
        request_body_sha256=old_hash
    )
    # Both blobs are older than the garbage collector's grace period.
    hour_ago = time.time() - 2 * 3600
    for path in (tmp_path / "prompts").rglob("*"):
        if path.is_file():
            os.utime(path, (hour_ago, hour_ago))
    return seeded, recent, old_hash, recent_hash


def test_retention_drops_old_raw_rows_and_their_prompts_and_changes_no_report(old_and_recent):
    seeded, recent, old_hash, recent_hash = old_and_recent
    before = every_report(seeded.experiment, seeded.swap_at)
    out = io.StringIO()
    call_command("retention", "apply", "--older-than", "60", stdout=out)
    assert set(ExperimentRequest.objects.values_list("usage_id", flat=True)) == {
        r.usage_id for r in recent
    }
    assert GatewayUsage.objects.count() == len(recent)
    assert every_report(seeded.experiment, seeded.swap_at) == before
    store = get_prompt_store()
    assert store.exists(recent_hash)
    assert not store.exists(old_hash)
    if connection.vendor == "postgresql":
        old_month = month_start(seeded.start.astimezone(UTC))
        assert old_month not in existing_partitions("gateway_usage")
        assert f"partition model_experiment_request_p{old_month:%Y%m}" in out.getvalue()


def test_retention_dry_run_changes_nothing(old_and_recent):
    seeded, recent, _, _ = old_and_recent
    rows = ExperimentRequest.objects.count()
    out = io.StringIO()
    call_command("retention", "apply", "--older-than", "60", "--dry-run", stdout=out)
    assert "Dry run: nothing was changed." in out.getvalue()
    assert ExperimentRequest.objects.count() == rows == len(seeded.requests) + len(recent)


@pytest.mark.parametrize("days", ["0", "-3", "soon", "1.5"])
def test_retention_refuses_a_bad_age_and_changes_nothing(days):
    seeded = seed_experiment(subjects=4, requests=8)
    with pytest.raises(CommandError, match="older-than"):
        call_command("retention", "apply", "--older-than", days)
    assert ExperimentRequest.objects.count() == len(seeded.requests)


def test_month_start_is_the_first_day_in_utc():
    assert month_start(date(2025, 3, 17)) == date(2025, 3, 1)
