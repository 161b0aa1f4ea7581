"""Report read-side benchmark on PostgreSQL (issue #4).

Seeds 1,000,000 attributed requests across two slots and three checkpoints
(slot A hot-swaps half-way) in a separate database, then times the stats page's
queries and the first and a deep page of the request browser.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mx_dev \\
        /work/venv/bin/python bench/bench_reports.py [--rows N] [--keep]

Targets: stats <= 500 ms, any request-browser page <= 50 ms (median of runs).
The stats figures are "cold": the report cache is bypassed, PostgreSQL's buffers
are warm. The report's queries run side by side on two connections
(experiments.reports.REPORT_CONNECTIONS) with work_mem 64MB for their own
transactions (REPORT_SESSION_SETTINGS); the server's defaults are untouched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_DATABASE = "mx_bench_reports"
STATS_TARGET_MS = 500
PAGE_TARGET_MS = 50


def say(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)


def server_url() -> str:
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    if not url.startswith(("postgres://", "postgresql://")):
        sys.exit("bench_reports needs DATABASE_URL pointing at a PostgreSQL server")
    return url


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def recreate_database(url: str) -> None:
    import psycopg

    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DATABASE}")


def drop_database(url: str) -> None:
    import psycopg

    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")


def median_ms(action, runs: int) -> tuple[float, list[float]]:
    timings = []
    for _ in range(runs):
        began = time.perf_counter()
        action()
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings), timings


def seed(rows: int, started: float):
    from django.db import connection

    from experiments import crypto
    from experiments.models import Experiment, Variant, VariantVersion

    start = datetime(2025, 1, 1, tzinfo=UTC)
    span = timedelta(days=7)
    swap_at = start + span / 2
    experiment = Experiment.objects.create(
        public_model_id="kilo/preview-bench", name="Bench", status="active", started_at=start
    )
    key = crypto.encrypt_api_key("sk-bench-not-a-real-key")
    slot_a = Variant.objects.create(experiment=experiment, label="slot-a", weight=1)
    slot_b = Variant.objects.create(experiment=experiment, label="slot-b", weight=1)
    versions = {
        "a1": VariantVersion.objects.create(
            variant=slot_a,
            upstream={"internal_id": "rc-alpha-1", "base_url": "https://partner.example/v1"},
            encrypted_api_key=key,
            effective_at=start - timedelta(days=1),
        ),
        "a2": VariantVersion.objects.create(
            variant=slot_a,
            upstream={"internal_id": "rc-alpha-2", "base_url": "https://partner.example/v1"},
            encrypted_api_key=key,
            effective_at=swap_at,
        ),
        "b1": VariantVersion.objects.create(
            variant=slot_b,
            upstream={"internal_id": "rc-bravo-1", "base_url": "https://partner.example/v1"},
            encrypted_api_key=key,
            effective_at=start - timedelta(days=1),
        ),
    }
    step_ms = span.total_seconds() * 1000 / rows
    chunk = 100_000
    # Request i: subject i % 50,000; even subjects in slot A, odd in slot B; slot A
    # is served by a1 before the swap and a2 after it.
    with connection.cursor() as cursor:
        for low in range(0, rows, chunk):
            high = min(rows, low + chunk) - 1
            params = {
                "low": low,
                "high": high,
                "start": start,
                "step": step_ms,
                "swap": swap_at,
                "a1": versions["a1"].pk,
                "a2": versions["a2"].pk,
                "b1": versions["b1"].pk,
            }
            cursor.execute(
                """
                INSERT INTO gateway_usage (id, created_at, user_id, public_model_id, request_kind,
                    is_stream, status_code, has_error, error_kind, input_tokens, output_tokens,
                    ttfb_ms, total_ms)
                SELECT md5('u' || i)::uuid,
                       %(start)s + (i * %(step)s) * interval '1 millisecond',
                       NULL, 'kilo/preview-bench', 'chat_completions', i %% 3 = 0,
                       CASE WHEN i %% 37 = 0 THEN 500 ELSE 200 END, i %% 37 = 0,
                       NULL, 50 + i %% 400, 20 + i %% 900,
                       80 + (i * 7919) %% 900, 300 + (i * 104729) %% 6000
                FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS i
                """,
                params,
            )
            # The attribution row carries exact copies of the usage measures, as
            # the gateway writer stores them; the subject pseudonym is the first
            # 16 bytes of a SHA-256, as a uuid.
            cursor.execute(
                """
                INSERT INTO model_experiment_request (usage_id, variant_version_id,
                    allocation_subject, allocation_subject_hash, client_request_id,
                    request_kind, request_body_sha256, was_truncated, created_at,
                    status_code, has_error, is_stream, input_tokens, output_tokens,
                    ttfb_ms, total_ms)
                SELECT u.id,
                       CASE WHEN (i %% 50000) %% 2 = 1 THEN %(b1)s::uuid
                            WHEN u.created_at < %(swap)s THEN %(a1)s::uuid
                            ELSE %(a2)s::uuid END,
                       (ARRAY['user', 'machine', 'ip'])[1 + (i %% 50000) %% 3],
                       substr(encode(sha256(('subject-' || (i %% 50000))::bytea), 'hex'),
                              1, 32)::uuid,
                       'msg-' || (i / 2),
                       'chat_completions',
                       encode(sha256(('body-' || i)::bytea), 'hex'),
                       false,
                       u.created_at,
                       u.status_code, u.has_error, u.is_stream, u.input_tokens,
                       u.output_tokens, u.ttfb_ms, u.total_ms
                FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS i
                JOIN gateway_usage u ON u.id = md5('u' || i)::uuid
                """,
                params,
            )
            say(f"seeded {high + 1:,} / {rows:,} requests", started)
        # As autovacuum would have by now on a table this old: statistics, and a
        # visibility map so index-only scans skip the heap.
        cursor.execute("VACUUM ANALYZE gateway_usage")
        cursor.execute("VACUUM ANALYZE model_experiment_request")
    say("vacuumed and analyzed", started)
    return experiment


def deep_cursor(experiment, page: int, page_size: int) -> str:
    """The cursor a reader holds on ``page`` (untimed: found with OFFSET once)."""
    from experiments.models import ExperimentRequest
    from experiments.reports import encode_cursor

    last = (
        ExperimentRequest.objects.filter(variant_version__variant__experiment=experiment)
        .order_by("-created_at", "-usage_id")
        .values_list("created_at", "usage_id")[(page - 1) * page_size - 1]
    )
    return encode_cursor(*last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--deep-page", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()
    started = time.perf_counter()
    url = server_url()
    recreate_database(url)
    say(f"created database {BENCH_DATABASE}", started)
    os.environ["DATABASE_URL"] = with_database(url, BENCH_DATABASE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    # The cached-report figure uses Redis when REDIS_URL is set (local memory otherwise).
    from experiments import crypto

    os.environ.setdefault("BYOK_ENCRYPTION_KEY", crypto.generate_key())
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from experiments import charts
    from experiments.reports import (
        BROWSER_PAGE_SIZE,
        BrowserFilters,
        ReportFilters,
        browse_requests,
        cached_experiment_report,
        experiment_report,
    )

    try:
        call_command("migrate", verbosity=0)
        say("migrated", started)
        experiment = seed(args.rows, started)

        def stats(filters=None, cached=False):
            if cached:
                report = cached_experiment_report(experiment, filters or ReportFilters())
            else:
                report = experiment_report(experiment, filters)
            charts.requests_over_time(report.timeseries, report.checkpoints)
            charts.latency_percentiles(report.checkpoints)
            charts.observed_vs_configured_share(report.slots)
            return report

        report = stats()  # warm the caches once
        # Inside a transaction the report's queries all run on this connection
        # (outside one they are spread over several), so every one is captured.
        with CaptureQueriesContext(connection) as queries, transaction.atomic():
            stats()
        assert not [q for q in queries if "encrypted_api_key" in q["sql"]]
        say(f"stats issues {len(queries)} queries; none selects encrypted_api_key", started)
        last_day = ReportFilters(since=datetime(2025, 1, 7, tzinfo=UTC))
        results = []
        stats_all, runs = median_ms(stats, args.runs)
        results.append(("stats, all time, cold queries", stats_all, STATS_TARGET_MS, runs))
        stats_day, runs = median_ms(lambda: stats(last_day), args.runs)
        results.append(("stats, last day", stats_day, STATS_TARGET_MS, runs))
        machine = ReportFilters(subject_kind="machine")
        stats_machine, runs = median_ms(lambda: stats(machine), args.runs)
        results.append(("stats, machine subjects only", stats_machine, STATS_TARGET_MS, runs))
        stats(cached=True)
        stats_cached, runs = median_ms(lambda: stats(cached=True), args.runs)
        results.append(("stats page, all time, cached report", stats_cached, STATS_TARGET_MS, runs))
        say("timed stats", started)

        first, runs = median_ms(lambda: browse_requests(experiment), args.runs * 2)
        results.append(("browser, first page", first, PAGE_TARGET_MS, runs))
        cursor = deep_cursor(experiment, args.deep_page, BROWSER_PAGE_SIZE)
        deep_page = browse_requests(experiment, cursor=cursor)
        assert len(deep_page.rows) == BROWSER_PAGE_SIZE
        deep, runs = median_ms(lambda: browse_requests(experiment, cursor=cursor), args.runs * 2)
        results.append((f"browser, page {args.deep_page:,}", deep, PAGE_TARGET_MS, runs))
        errors = BrowserFilters(status="error")
        filtered, runs = median_ms(
            lambda: browse_requests(experiment, errors, cursor=cursor), args.runs * 2
        )
        results.append(
            (f"browser, errors only, from page {args.deep_page:,}", filtered, PAGE_TARGET_MS, runs)
        )
        say("timed the request browser", started)

        print()
        print(
            f"{report.total_requests:,} attributed requests, {len(report.checkpoints)} checkpoints"
        )
        print(f"{'measure':44} {'median':>10} {'target':>9}  verdict  runs (ms)")
        for name, median, target, runs in results:
            verdict = "ok" if median <= target else "MISSED"
            shown = " ".join(f"{value:.0f}" for value in runs)
            print(f"{name:44} {median:8.1f}ms {target:7d}ms  {verdict:7}  {shown}")
        say("done", started)
    finally:
        connection.close()
        if not args.keep:
            drop_database(url)


if __name__ == "__main__":
    main()
