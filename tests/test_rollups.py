"""Rollups: built as records land they equal rollups rebuilt from the raw rows, and every
report figure equals the same figure recomputed from the raw rows (percentiles within
the stated 1%), for all time, windows and subject kinds."""

from __future__ import annotations

import io
import math
import random
import statistics
from collections import defaultdict
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db.models import Sum

from experiments.models import (
    CheckpointMessage,
    CheckpointSubject,
    ErrorKindRollup,
    LatencyBin,
    RequestRollup,
    SlotSubject,
)
from experiments.reports import rollups
from experiments.reports.filters import ReportFilters, bucket_ranges
from experiments.reports.histogram import RELATIVE_ACCURACY, key_of, percentile, value_of
from experiments.reports.report import experiment_report
from tests.report_seed import CATEGORIES, FINISHES, insert_requests, seed_experiment


def quantile(values, fraction):
    """percentile_cont, independently: linear interpolation between closest ranks."""
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (rank - lower) * (ordered[upper] - ordered[lower])


def throughput(row):
    if not row.output_tokens or row.ttfb_ms is None or row.total_ms <= row.ttfb_ms:
        return None
    return row.output_tokens * 1000 / (row.total_ms - row.ttfb_ms)


def rollup_state() -> dict:
    """Every rollup sum per key, whichever writers hold it, and every first-seen row."""
    state = {}
    for model, sums in (
        (RequestRollup, rollups.MEASURES),
        (ErrorKindRollup, ("count",)),
        (LatencyBin, ("count",)),
    ):
        key = [f.attname for f in model._meta.pk_fields if f.attname != "writer"]
        rows = model.objects.values(*key).annotate(**{f"sum_{c}": Sum(c) for c in sums})
        state[model.__name__] = {
            tuple(row[k] for k in key): tuple(int(row[f"sum_{c}"]) for c in sums)
            for row in rows
            if any(row[f"sum_{c}"] for c in sums)
        }
    for model in (SlotSubject, CheckpointSubject, CheckpointMessage):
        columns = [f.attname for f in model._meta.concrete_fields if "previous" not in f.attname]
        state[model.__name__] = set(model.objects.values_list(*columns))
    return state


def report_figures(experiment, filters=None) -> dict:
    report = experiment_report(experiment, filters)
    figures = {}
    for checkpoint in report.checkpoints:
        figures[checkpoint.version_id] = {
            name: value
            for name, value in vars(checkpoint).items()
            if name not in ("first_request_at", "last_request_at")
        }
    figures["slots"] = [(s.slot_id, s.distinct_subjects) for s in report.slots]
    # An open window's chart runs to "now": the requests per bucket, not the empty buckets a
    # minute passing between two reports adds at the end.
    series = report.timeseries
    figures["series"] = {
        (version_id, series.bucket_seconds, bucket): count
        for version_id, counts in series.counts.items()
        for bucket, count in zip(series.buckets, counts, strict=True)
        if count
    }
    return figures


def windows(seeded):
    minute = seeded.start.replace(second=0)
    return [
        ReportFilters(),
        ReportFilters(subject_kind="machine"),
        ReportFilters(since=minute + timedelta(minutes=17), until=minute + timedelta(minutes=93)),
        ReportFilters(since=seeded.swap_at - timedelta(minutes=5), subject_kind="user"),
        ReportFilters(until=minute + timedelta(minutes=61, seconds=30)),
    ]


# --- incremental == rebuilt -------------------------------------------------------


@pytest.mark.django_db
def test_rollups_written_by_several_writers_out_of_order_equal_a_rebuild_from_raw_rows():
    seeded = seed_experiment(subjects=90, requests=500, writers=4)
    incremental = rollup_state()
    # Every count is exercised, the quality signals' too (errors by category, finish reasons).
    totals = [sum(values) for values in zip(*incremental["RequestRollup"].values(), strict=True)]
    for name in (*(f"errors_{c}" for c in CATEGORIES), *(f"finish_{f}" for f in FINISHES[:-1])):
        assert totals[rollups.MEASURES.index(name)] > 0, name
    reports = [report_figures(seeded.experiment, f) for f in windows(seeded)]
    rollups.rebuild()
    assert rollup_state() == incremental
    assert [report_figures(seeded.experiment, f) for f in windows(seeded)] == reports


@pytest.mark.django_db
def test_rebuild_command_shows_progress_and_counts_the_rows():
    seeded = seed_experiment(subjects=20, requests=60)
    before = report_figures(seeded.experiment)
    out, err = io.StringIO(), io.StringIO()
    call_command("rollups", "rebuild", stdout=out, stderr=err)
    assert "Rebuilt the rollups from 60 attribution row(s)" in out.getvalue()
    assert "days   [" in err.getvalue()
    assert report_figures(seeded.experiment) == before


@pytest.mark.django_db
def test_compaction_folds_every_writer_into_one_share_and_changes_no_figure():
    seeded = seed_experiment(subjects=60, requests=300, writers=3)
    before = [report_figures(seeded.experiment, f) for f in windows(seeded)]
    out = io.StringIO()
    call_command("rollups", "compact", stdout=out)
    assert "Compacted" in out.getvalue()
    for model in (RequestRollup, ErrorKindRollup, LatencyBin):
        assert set(model.objects.values_list("writer", flat=True)) == {rollups.COMPACTED_WRITER}
    assert [report_figures(seeded.experiment, f) for f in windows(seeded)] == before


@pytest.mark.django_db
def test_a_replayed_record_counts_once():
    seeded = seed_experiment(subjects=30, requests=120)
    before = rollup_state()
    figures = report_figures(seeded.experiment)
    public_id = seeded.experiment.public_model_id
    assert insert_requests(seeded.requests[:50], public_model_id=public_id, writer=77) == []
    assert rollup_state() == before
    assert report_figures(seeded.experiment) == figures


# --- every figure equals the raw rows ------------------------------------------------


def in_window(rows, filters):
    filters = filters.aligned()
    return [
        r
        for r in rows
        if (filters.since is None or r.created_at >= filters.since)
        and (filters.until is None or r.created_at < filters.until)
        and (filters.subject_kind is None or r.subject_kind == filters.subject_kind)
    ]


def first_seen_in_window(rows, key, filters):
    """Keys whose earliest row falls in the window (and is of the subject kind)."""
    first = {}
    for row in sorted(rows, key=lambda r: r.created_at):
        first.setdefault(key(row), row)
    return {k for k, row in first.items() if row in in_window([row], filters)}


@pytest.mark.django_db
@pytest.mark.parametrize("window", range(5))
def test_every_figure_equals_the_raw_rows(window):
    seeded = seed_experiment(subjects=120, requests=700, writers=3)
    filters = windows(seeded)[window]
    report = experiment_report(seeded.experiment, filters)
    rows = in_window(seeded.requests, filters)
    in_hours = in_window(seeded.requests, filters.histogram_window())
    for checkpoint in report.checkpoints:
        mine = [r for r in rows if r.version_id == checkpoint.version_id]
        # Percentiles cover the window widened to whole hours.
        hourly = [r for r in in_hours if r.version_id == checkpoint.version_id]
        everything = [r for r in seeded.requests if r.version_id == checkpoint.version_id]
        assert checkpoint.requests == len(mine)
        assert checkpoint.errors == sum(r.has_error for r in mine)
        assert checkpoint.streamed == sum(r.is_stream for r in mine)
        kinds = defaultdict(int)
        for r in mine:
            if r.has_error:
                kinds[r.error_kind] += 1
        assert checkpoint.errors_by_raw_kind == dict(kinds)
        categories = dict.fromkeys(CATEGORIES, 0)
        for r in mine:
            if r.has_error:
                categories[r.error_category] += 1
        assert checkpoint.errors_by_kind == categories
        finishes = dict.fromkeys(FINISHES, 0)
        for r in mine:
            if not r.has_error:
                finishes[r.finish_reason or "unknown"] += 1
        assert checkpoint.finish_reasons == finishes
        successes = sum(not r.has_error for r in mine)
        assert checkpoint.tool_call_rate == (
            finishes["tool_calls"] / successes if successes else None
        )
        classes = defaultdict(int)
        for r in mine:
            classes[f"{r.status_code // 100}xx"] += 1
        assert checkpoint.status_classes == dict(classes)
        assert checkpoint.input_tokens == sum(r.input_tokens for r in mine)
        assert checkpoint.output_tokens == sum(r.output_tokens for r in mine)
        totals = [r.total_ms for r in mine]
        assert checkpoint.total_samples == len(totals)
        if len(totals) > 1:
            assert checkpoint.total_mean == pytest.approx(statistics.fmean(totals), rel=1e-12)
            assert checkpoint.total_variance == pytest.approx(
                statistics.variance(totals), rel=1e-12
            )
        for name, values in (
            ("ttfb", [r.ttfb_ms for r in hourly if r.ttfb_ms is not None]),
            ("total", [r.total_ms for r in hourly]),
            ("throughput", [t for t in map(throughput, hourly) if t is not None]),
        ):
            for fraction, suffix in ((0.5, "p50"), (0.95, "p95")):
                found = getattr(checkpoint, f"{name}_{suffix}")
                if not values:
                    assert found is None
                    continue
                exact = quantile(values, fraction)
                assert found == pytest.approx(exact, rel=RELATIVE_ACCURACY), (name, suffix)
        assert checkpoint.distinct_subjects == len(
            first_seen_in_window(everything, lambda r: r.subject_hash, filters)
        )
        assert checkpoint.distinct_users == len(
            first_seen_in_window(
                [r for r in everything if r.user_id], lambda r: r.subject_hash, filters
            )
        )
        assert checkpoint.distinct_messages == len(
            first_seen_in_window(
                [r for r in everything if r.client_request_id],
                lambda r: r.client_request_id,
                filters,
            )
        )
    for slot in report.slots:
        in_slot = [r for r in seeded.requests if r.slot_label == slot.label]
        assert slot.distinct_subjects == len(
            first_seen_in_window(in_slot, lambda r: r.subject_hash, filters)
        )
    for checkpoint in report.checkpoints:
        assert sum(report.timeseries.counts[checkpoint.version_id]) == checkpoint.requests


@pytest.mark.django_db
def test_an_earlier_record_landing_late_moves_its_subject_to_the_earlier_minute():
    seeded = seed_experiment(subjects=3, requests=3)
    late = seeded.requests[0]
    version = late.version_id

    def distinct_subjects(filters=None):
        checkpoints = experiment_report(seeded.experiment, filters).checkpoints
        return next(c.distinct_subjects for c in checkpoints if c.version_id == version)

    all_time = distinct_subjects()
    import uuid
    from dataclasses import replace

    earlier = replace(
        late,
        usage_id=uuid.uuid4(),
        created_at=late.created_at - timedelta(minutes=10),
        client_request_id=None,
    )
    insert_requests([earlier], public_model_id=seeded.experiment.public_model_id, writer=99)
    minute = earlier.created_at.replace(second=0)
    around_earlier = ReportFilters(since=minute, until=minute + timedelta(minutes=1))
    around_late = ReportFilters(
        since=late.created_at.replace(second=0),
        until=late.created_at.replace(second=0) + timedelta(minutes=1),
    )
    assert distinct_subjects() == all_time
    assert distinct_subjects(around_earlier) == 1
    assert distinct_subjects(around_late) == 0
    incremental = rollup_state()
    rollups.rebuild()
    assert rollup_state() == incremental


# --- windows -----------------------------------------------------------------------


def test_a_window_reads_whole_days_in_the_middle_and_hours_and_minutes_at_its_edges():
    day, hour, minute = 86400, 3600, 60
    since = 10 * day + 22 * hour + 57 * minute
    until = 13 * day + 1 * hour + 2 * minute
    assert bucket_ranges(since, until) == [
        (day, 11 * day, 13 * day),
        (hour, 10 * day + 23 * hour, 11 * day),
        (minute, since, 10 * day + 23 * hour),
        (hour, 13 * day, 13 * day + hour),
        (minute, 13 * day + hour, until),
    ]


def test_an_open_window_reads_whole_days_up_to_its_one_edge():
    assert bucket_ranges(None, 86400 + 120) == [(86400, None, 86400), (60, 86400, 86400 + 120)]


# --- histograms --------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_histogram_percentiles_are_within_one_percent_of_percentile_cont(fraction):
    rng = random.Random(11)
    values = [rng.lognormvariate(6, 1.2) for _ in range(5000)] + [0.0] * 20
    bins = [(key_of(v), 1) for v in values]
    assert percentile(bins, fraction) == pytest.approx(
        quantile(values, fraction), rel=RELATIVE_ACCURACY, abs=1e-9
    )


@pytest.mark.parametrize("value", [0.001, 0.5, 1, 2, 999, 1000, 123456, 10**9])
def test_a_value_is_within_one_percent_of_its_bins_value(value):
    assert value_of(key_of(value)) == pytest.approx(value, rel=RELATIVE_ACCURACY)


def test_histogram_of_no_values_has_no_percentile():
    assert percentile([], 0.5) is None


@pytest.mark.django_db
def test_errors_recorded_before_categories_count_as_unclassified_after_a_rebuild():
    """Rows written before the quality signals carry neither an error category nor a
    finish reason: a rebuild counts their errors as unclassified and their answers'
    finish reason as unknown, and every figure still adds up."""
    from experiments.models import ExperimentRequest

    seeded = seed_experiment(subjects=30, requests=150)
    ExperimentRequest.objects.update(error_category=None, finish_reason=None)
    rollups.rebuild()
    report = experiment_report(seeded.experiment)
    for checkpoint in report.checkpoints:
        mine = [r for r in seeded.requests if r.version_id == checkpoint.version_id]
        errors = sum(r.has_error for r in mine)
        assert checkpoint.errors_by_kind == {**dict.fromkeys(CATEGORIES, 0), "unclassified": errors}
        assert checkpoint.finish_reasons == {
            **dict.fromkeys(FINISHES[:-1], 0),
            "unknown": len(mine) - errors,
        }
    assert any("Unclassified errors were recorded before" in note for note in report.notes)
