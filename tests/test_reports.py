"""Per-checkpoint figures, SRM and comparisons against independent computations
from the raw seeded rows; the experiment_report command."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import uuid
from collections import defaultdict
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from experiments.reports.figures import bucket_seconds_for
from experiments.reports.filters import ReportFilters, ReportInputError
from experiments.reports.histogram import RELATIVE_ACCURACY
from experiments.reports.report import experiment_report
from tests.report_seed import CATEGORIES, FINISHES, seed_experiment


def by_version(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[row.version_id].append(row)
    return grouped


def quantile(values, fraction):
    """Independent percentile_cont: statistics' inclusive method is linear interpolation."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(fraction * 100) - 1]


@pytest.fixture
def seeded(db):
    return seed_experiment()


# --- figures ------------------------------------------------------------------


def test_each_row_counts_for_the_checkpoint_that_served_it_across_a_hot_swap(seeded):
    report = experiment_report(seeded.experiment)
    expected = by_version(seeded.requests)
    assert {c.version_id for c in report.checkpoints} == set(expected)
    for checkpoint in report.checkpoints:
        rows = expected[checkpoint.version_id]
        assert checkpoint.requests == len(rows)
        assert checkpoint.errors == sum(r.has_error for r in rows)
        assert checkpoint.error_rate == pytest.approx(sum(r.has_error for r in rows) / len(rows))
        assert checkpoint.input_tokens == sum(r.input_tokens for r in rows)
        assert checkpoint.output_tokens == sum(r.output_tokens for r in rows)


def test_distinct_subjects_users_and_messages_match_raw_rows(seeded):
    report = experiment_report(seeded.experiment)
    expected = by_version(seeded.requests)
    for checkpoint in report.checkpoints:
        rows = expected[checkpoint.version_id]
        assert checkpoint.distinct_subjects == len({r.subject_hash for r in rows})
        assert checkpoint.distinct_users == len({r.user_id for r in rows if r.user_id})
        assert checkpoint.distinct_messages == len(
            {r.client_request_id for r in rows if r.client_request_id}
        )


def test_percentiles_match_linear_interpolation_of_raw_values(seeded):
    report = experiment_report(seeded.experiment)
    expected = by_version(seeded.requests)
    for checkpoint in report.checkpoints:
        rows = expected[checkpoint.version_id]
        ttfb = [r.ttfb_ms for r in rows if r.ttfb_ms is not None]
        total = [r.total_ms for r in rows]
        # Histogram percentiles: within the stated 1% of percentile_cont.
        assert checkpoint.ttfb_p50 == pytest.approx(quantile(ttfb, 0.5), rel=RELATIVE_ACCURACY)
        assert checkpoint.ttfb_p95 == pytest.approx(quantile(ttfb, 0.95), rel=RELATIVE_ACCURACY)
        assert checkpoint.total_p50 == pytest.approx(quantile(total, 0.5), rel=RELATIVE_ACCURACY)
        assert checkpoint.total_p95 == pytest.approx(quantile(total, 0.95), rel=RELATIVE_ACCURACY)
        assert checkpoint.total_mean == pytest.approx(statistics.fmean(total))


def test_latency_variance_and_samples_match_raw_values(seeded):
    report = experiment_report(seeded.experiment)
    expected = by_version(seeded.requests)
    for checkpoint in report.checkpoints:
        total = [r.total_ms for r in expected[checkpoint.version_id]]
        assert checkpoint.total_samples == len(total)
        assert checkpoint.total_variance == pytest.approx(statistics.variance(total), rel=1e-12)


def test_requests_newer_than_the_series_end_still_count_in_the_figures(db):
    # Since-only window: the series ends at the report's clock, the figures do not.
    seeded = seed_experiment(start=timezone.now() - timedelta(minutes=30))
    report = experiment_report(
        seeded.experiment, ReportFilters(since=timezone.now() - timedelta(hours=3))
    )
    expected = by_version(seeded.requests)
    for checkpoint in report.checkpoints:
        rows = expected[checkpoint.version_id]
        assert checkpoint.requests == len(rows)
        assert checkpoint.first_request_at == min(r.created_at for r in rows)
        assert checkpoint.last_request_at == max(r.created_at for r in rows)


def test_checkpoints_are_grouped_under_their_slot_with_effective_periods(seeded):
    report = experiment_report(seeded.experiment)
    slots = {slot.label: slot for slot in report.slots}
    a1, a2 = slots["slot-a"].checkpoints
    assert (a1.internal_id, a2.internal_id) == ("rc-alpha-1", "rc-alpha-2")
    assert a1.effective_until == seeded.swap_at == a2.effective_from
    assert a2.is_current and not a1.is_current
    assert [c.internal_id for c in slots["slot-b"].checkpoints] == ["rc-bravo-1"]


def test_subject_kind_filter_counts_only_that_kind(seeded):
    report = experiment_report(seeded.experiment, ReportFilters(subject_kind="machine"))
    expected = by_version([r for r in seeded.requests if r.subject_kind == "machine"])
    for checkpoint in report.checkpoints:
        assert checkpoint.requests == len(expected[checkpoint.version_id])


def test_time_window_includes_since_and_excludes_until(seeded):
    since = seeded.start.replace(second=0) + timedelta(minutes=30)
    until = seeded.start.replace(second=0) + timedelta(minutes=90)
    report = experiment_report(seeded.experiment, ReportFilters(since=since, until=until))
    inside = [r for r in seeded.requests if since <= r.created_at < until]
    assert report.total_requests == len(inside)
    assert not report.filters.widened


def test_window_edges_inside_a_minute_are_moved_out_to_whole_minutes_and_said(seeded):
    since = seeded.start.replace(second=0) + timedelta(minutes=30, seconds=20)
    until = seeded.start.replace(second=0) + timedelta(minutes=90, seconds=40)
    report = experiment_report(seeded.experiment, ReportFilters(since=since, until=until))
    assert report.filters.widened
    assert report.filters.since == since.replace(second=0)
    assert report.filters.until == until.replace(second=0) + timedelta(minutes=1)
    inside = [
        r for r in seeded.requests if report.filters.since <= r.created_at < report.filters.until
    ]
    assert report.total_requests == len(inside)


def test_since_after_until_is_refused(seeded):
    with pytest.raises(ReportInputError, match="since"):
        ReportFilters(since=seeded.start, until=seeded.start - timedelta(seconds=1))


def test_unknown_subject_kind_is_refused():
    with pytest.raises(ReportInputError, match="subject kind"):
        ReportFilters(subject_kind="robot")


# --- sample-ratio mismatch ----------------------------------------------------


def independent_chi_square(rows, slot_order):
    per_slot = defaultdict(set)
    for row in rows:
        per_slot[row.slot_label].add(row.subject_hash)
    observed = [len(per_slot[label]) for label in slot_order]
    expected = sum(observed) / 2
    statistic = sum((count - expected) ** 2 / expected for count in observed)
    # chi-square with one degree of freedom: P(X >= x) = erfc(sqrt(x / 2)).
    return observed, statistic, math.erfc(math.sqrt(statistic / 2))


@pytest.mark.django_db
def test_skewed_split_triggers_the_srm_warning():
    seeded = seed_experiment(share_of_slot_a=0.7)
    report = experiment_report(seeded.experiment)
    srm = report.srm
    observed, statistic, p_value = independent_chi_square(
        seeded.requests, [slot.label for slot in report.slots]
    )
    assert srm.observed == observed
    assert srm.chi_square == pytest.approx(statistic)
    assert srm.p_value == pytest.approx(p_value, rel=1e-9)
    assert srm.mismatch


def test_balanced_split_has_no_srm_warning(seeded):
    report = experiment_report(seeded.experiment)
    srm = report.srm
    observed, statistic, p_value = independent_chi_square(
        seeded.requests, [slot.label for slot in report.slots]
    )
    assert srm.observed == observed
    assert srm.p_value == pytest.approx(p_value)
    assert not srm.mismatch


def test_slot_subject_seen_before_and_after_a_hot_swap_counts_once(seeded):
    report = experiment_report(seeded.experiment)
    slot_a = next(slot for slot in report.slots if slot.label == "slot-a")
    expected = {r.subject_hash for r in seeded.requests if r.slot_label == "slot-a"}
    assert slot_a.distinct_subjects == len(expected)
    assert slot_a.distinct_subjects < sum(c.distinct_subjects for c in slot_a.checkpoints)


@pytest.mark.django_db
def test_srm_is_not_run_with_too_few_subjects():
    seeded = seed_experiment(subjects=4, requests=8)
    srm = experiment_report(seeded.experiment).srm
    assert srm.p_value is None and "too few" in srm.reason


# Library numerics (scipy's chi-square, statsmodels' Wilson and Holm) and the comparisons
# against the control are checked against published values in tests/test_comparisons.py.


# --- time series --------------------------------------------------------------


def test_timeseries_counts_add_up_to_each_checkpoints_requests(seeded):
    report = experiment_report(seeded.experiment)
    for checkpoint in report.checkpoints:
        assert sum(report.timeseries.counts[checkpoint.version_id]) == checkpoint.requests


def test_timeseries_shows_the_handover_at_the_hot_swap(seeded):
    series = experiment_report(seeded.experiment).timeseries
    a1 = series.counts[seeded.versions["a1"].pk]
    a2 = series.counts[seeded.versions["a2"].pk]
    swap = seeded.swap_at
    for start, old, new in zip(series.buckets, a1, a2, strict=True):
        end = start + timedelta(seconds=series.bucket_seconds)
        if end <= swap:
            assert new == 0
        if start >= swap:
            assert old == 0
    assert any(a1) and any(a2)


@pytest.mark.parametrize(
    ("span", "size"),
    [(timedelta(hours=1), 60), (timedelta(days=1), 900), (timedelta(days=7), 3 * 3600)],
)
def test_bucket_size_keeps_a_window_within_120_points(span, size):
    assert bucket_seconds_for(span) == size


# --- the encrypted column -----------------------------------------------------


def test_report_queries_never_select_the_encrypted_key(seeded):
    with CaptureQueriesContext(connection) as queries:
        experiment_report(seeded.experiment)
    assert queries.captured_queries
    assert not [q for q in queries.captured_queries if "encrypted_api_key" in q["sql"]]


# --- experiment_report command ------------------------------------------------


def run_report(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command("experiment_report", *args, stdout=out, stderr=err)
    return out.getvalue()


def test_json_export_carries_the_same_figures_as_the_selector(seeded):
    exported = json.loads(run_report(str(seeded.experiment.pk), "--format", "json"))
    report = experiment_report(seeded.experiment)
    by_internal = {c["internal_id"]: c for s in exported["slots"] for c in s["checkpoints"]}
    for checkpoint in report.checkpoints:
        row = by_internal[checkpoint.internal_id]
        assert row["requests"] == checkpoint.requests
        assert row["error_rate"] == pytest.approx(checkpoint.error_rate)
        assert row["total_ms_p95"] == pytest.approx(checkpoint.total_p95)
    assert exported["srm"]["p_value"] == pytest.approx(report.srm.p_value)
    # The control slot's current checkpoint against the other slot's, one row per metric.
    assert len(exported["comparisons"]) == len(report.comparisons.rows) == 5


def test_csv_export_has_one_row_per_checkpoint(seeded):
    rows = list(csv.DictReader(io.StringIO(run_report(str(seeded.experiment.pk), "-f", "csv"))))
    assert sorted(r["internal_id"] for r in rows) == ["rc-alpha-1", "rc-alpha-2", "rc-bravo-1"]


def test_table_export_shows_srm_warning_for_a_skewed_split(db):
    seeded = seed_experiment(share_of_slot_a=0.7)
    assert "SAMPLE RATIO MISMATCH" in run_report(str(seeded.experiment.pk))


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_export_carries_no_identifying_fields_nor_the_key(db, canary_key, fmt):
    seeded = seed_experiment(api_key=canary_key)
    row = seeded.requests[0]
    from experiments.models import ExperimentRequest, VariantVersion

    ExperimentRequest.objects.filter(usage_id=row.usage_id).update(client_request_id=canary_key)
    ciphertext = VariantVersion.with_ciphertext.get(pk=row.version_id).encrypted_api_key
    output = run_report(str(seeded.experiment.pk), "--format", fmt)
    forbidden = [canary_key, ciphertext["data"], ciphertext["iv"], ciphertext["authTag"]]
    forbidden += [r.client_request_id for r in seeded.requests if r.client_request_id]
    forbidden += [r.subject_hash for r in seeded.requests]
    forbidden += [r.subject_hash[:32] for r in seeded.requests]  # the stored uuid, as hex
    forbidden += [str(uuid.UUID(r.subject_hash[:32])) for r in seeded.requests]
    forbidden += [str(r.usage_id) for r in seeded.requests]
    assert not [value for value in forbidden if value in output]
    assert "user_id" not in output and "client_request_id" not in output


def test_export_with_subject_kind_and_window_counts_only_matching_rows(seeded):
    since = (seeded.start.replace(second=0) + timedelta(minutes=30)).isoformat()
    exported = json.loads(
        run_report(
            str(seeded.experiment.pk), "--format", "json", "--since", since, "--subject-kind", "ip"
        )
    )
    total = sum(c["requests"] for s in exported["slots"] for c in s["checkpoints"])
    assert total == len(
        [
            r
            for r in seeded.requests
            if r.subject_kind == "ip"
            and r.created_at >= seeded.start.replace(second=0) + timedelta(minutes=30)
        ]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["00000000-0000-0000-0000-000000000000"], "No experiment"),
        (["not-a-uuid"], "No experiment"),
        (["{id}", "--since", "yesterday"], "Bad --since"),
        (["{id}", "--since", "2025-02-01", "--until", "2025-01-01"], "since"),
        (["{id}", "--subject-kind", "robot"], "subject kind"),
    ],
)
def test_bad_arguments_give_a_clear_error(seeded, args, message):
    args = [a.replace("{id}", str(seeded.experiment.pk)) for a in args]
    with pytest.raises(CommandError, match=message):
        run_report(*args)


@pytest.mark.parametrize(
    "args", [[], ["--subject-kind", "user"], ["--since", "2025-01-01", "--until", "2030-01-01"]]
)
def test_experiment_report_reads_no_raw_row(seeded, args):
    with CaptureQueriesContext(connection) as queries:
        run_report(str(seeded.experiment.pk), "--format", "json", *args)
    raw = ("model_experiment_request", "gateway_usage")
    assert not [q for q in queries.captured_queries if any(t in q["sql"] for t in raw)]


def test_json_export_carries_errors_by_kind_status_classes_and_throughput(seeded):
    exported = json.loads(run_report(str(seeded.experiment.pk), "--format", "json"))
    report = experiment_report(seeded.experiment)
    by_internal = {c["internal_id"]: c for s in exported["slots"] for c in s["checkpoints"]}
    for checkpoint in report.checkpoints:
        row = by_internal[checkpoint.internal_id]
        assert row["errors_by_kind"] == checkpoint.errors_by_kind
        assert sum(row["errors_by_kind"].values()) == row["errors"]
        assert row["status_classes"] == checkpoint.status_classes
        assert row["throughput_tok_s_p50"] == pytest.approx(checkpoint.throughput_p50)
        assert row["streamed"] == checkpoint.streamed


def test_json_export_says_when_the_window_was_widened(seeded):
    since = (seeded.start.replace(second=0) + timedelta(minutes=30, seconds=5)).isoformat()
    exported = json.loads(
        run_report(str(seeded.experiment.pk), "--format", "json", "--since", since)
    )
    assert exported["window"]["widened_to_whole_minutes"] is True
    assert any("widened to whole minutes" in note for note in exported["notes"])


# --- quality signals ----------------------------------------------------------------


def raw_quality(rows) -> dict:
    """The quality figures of one checkpoint, recounted from its seeded rows."""
    errors = dict.fromkeys(CATEGORIES, 0)
    finishes = dict.fromkeys(FINISHES, 0)
    for row in rows:
        if row.has_error:
            errors[row.error_category] += 1
        else:
            finishes[row.finish_reason or "unknown"] += 1
    successes = sum(not r.has_error for r in rows)
    speeds = [
        r.output_tokens * 1000 / (r.total_ms - r.ttfb_ms)
        for r in rows
        if r.output_tokens and r.ttfb_ms is not None and r.total_ms > r.ttfb_ms
    ]
    return {
        "errors_by_kind": errors,
        "finish_reasons": finishes,
        "tool_call_rate": finishes["tool_calls"] / successes if successes else None,
        "throughput": (quantile(speeds, 0.5), quantile(speeds, 0.95)),
    }


def test_json_export_carries_quality_signals_equal_to_the_raw_rows(seeded):
    exported = json.loads(run_report(str(seeded.experiment.pk), "--format", "json"))
    expected = by_version(seeded.requests)
    internal_to_version = {v.internal_id: v.pk for v in seeded.versions.values()}
    checkpoints = [c for s in exported["slots"] for c in s["checkpoints"]]
    assert len(checkpoints) == 3
    for row in checkpoints:
        raw = raw_quality(expected[internal_to_version[row["internal_id"]]])
        assert row["errors_by_kind"] == raw["errors_by_kind"]
        assert row["finish_reasons"] == raw["finish_reasons"]
        assert row["tool_call_rate"] == pytest.approx(raw["tool_call_rate"])
        p50, p95 = raw["throughput"]
        assert row["throughput_tok_s_p50"] == pytest.approx(p50, rel=RELATIVE_ACCURACY)
        assert row["throughput_tok_s_p95"] == pytest.approx(p95, rel=RELATIVE_ACCURACY)
    # The seed makes slot b call tools more: the figure tells the checkpoints apart.
    rates = {row["internal_id"]: row["tool_call_rate"] for row in checkpoints}
    assert rates["rc-bravo-1"] > max(rates["rc-alpha-1"], rates["rc-alpha-2"])
    assert any("Errors by kind: auth: the partner answered 401" in n for n in exported["notes"])


def test_csv_export_flattens_quality_signals_equal_to_the_raw_rows(seeded):
    rows = list(csv.DictReader(io.StringIO(run_report(str(seeded.experiment.pk), "-f", "csv"))))
    expected = by_version(seeded.requests)
    internal_to_version = {v.internal_id: v.pk for v in seeded.versions.values()}
    for row in rows:
        raw = raw_quality(expected[internal_to_version[row["internal_id"]]])
        for name, count in raw["errors_by_kind"].items():
            assert int(row[f"errors_{name}"]) == count, name
        assert int(row["errors_unclassified"]) == 0
        for name, count in raw["finish_reasons"].items():
            assert int(row[f"finish_{name}"]) == count, name
        assert float(row["tool_call_rate"]) == pytest.approx(raw["tool_call_rate"])
        p50, p95 = raw["throughput"]
        assert float(row["throughput_tok_s_p50"]) == pytest.approx(p50, rel=RELATIVE_ACCURACY)
        assert float(row["throughput_tok_s_p95"]) == pytest.approx(p95, rel=RELATIVE_ACCURACY)


def test_table_export_shows_each_checkpoints_quality_signals(seeded):
    text = run_report(str(seeded.experiment.pk))
    expected = by_version(seeded.requests)
    for version in seeded.versions.values():
        raw = raw_quality(expected[version.pk])
        block = text[text.index(f"  {version.variant.label}/{version.internal_id}:\n") :]
        block = block[: block.index("tok/s")]
        assert f"rate limit {raw['errors_by_kind']['rate_limit']:,}" in block
        assert f"upstream 5xx {raw['errors_by_kind']['upstream_5xx']:,}" in block
        assert f"tool-call rate {raw['tool_call_rate'] * 100:.2f}%" in block
