"""Report benchmark on PostgreSQL: the same figures at two sizes, side by side.

For each size (default 1,000,000 and 10,000,000 attributed requests over a week, two
slots and three checkpoints, slot A hot-swapping half-way) it seeds a fresh database
with INSERT ... SELECT generate_series (no Python per row), rebuilds the rollups from
the raw rows (``rollups.rebuild``, timed), then times the stats page (all time,
last day, machine subjects only; cold: nothing is cached, PostgreSQL's buffers are
warm), the request browser (first page, a deep page, errors only), and the gateway
CPU that maintaining the rollups costs per record (``record_requests`` on batches as
the writer sends them).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        python bench/bench_reports.py [--rows 1000000 10000000] [--keep]

Targets: stats <= 50 ms at both sizes and the larger within 1.5x of the smaller; any
request-browser page <= 20 ms; rollup upkeep <= 0.1 ms of gateway CPU per record.
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
STATS_TARGET_MS = 50
PAGE_TARGET_MS = 20
#: The larger size's stats time may be at most this multiple of the smaller's.
STATS_GROWTH_TARGET = 1.5
WRITE_TARGET_US = 100


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
    from experiments.partitions import ensure_partitions, month_start

    # The data's month only (as production holds recent months): empty partitions
    # between 2025 and now would only add planning time to the request browser.
    ensure_partitions(first_month=month_start(start), months_ahead=0, today=start.date())
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
                       CASE WHEN i %% 37 = 0 THEN 'upstream_5xx' END, 50 + i %% 400, 20 + i %% 900,
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
                    status_code, has_error, error_kind, is_stream, input_tokens, output_tokens,
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
                       u.status_code, u.has_error, u.error_kind, u.is_stream, u.input_tokens,
                       u.output_tokens, u.ttfb_ms, u.total_ms
                FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS i
                JOIN gateway_usage u ON u.id = md5('u' || i)::uuid
                    AND u.created_at = %(start)s + (i * %(step)s) * interval '1 millisecond'
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


def write_cost_us(batch_size: int, batches: int = 30) -> float:
    """Gateway CPU (process time) per record of ``record_requests`` on writer-sized
    batches of new records: distinct client request ids, subjects mostly seen before."""
    import random
    import uuid

    from django.db import transaction
    from django.utils import timezone

    from experiments.models import VariantVersion
    from experiments.reports import rollups

    versions = list(VariantVersion.objects.values_list("pk", flat=True))
    rng = random.Random(5)
    subjects = [uuid.uuid4() for _ in range(5000)]
    now = timezone.now()

    def record(at):
        ttfb = rng.randint(50, 900)
        return {
            "usage_id": uuid.uuid4(),
            "variant_version_id": rng.choice(versions),
            "created_at": at,
            "allocation_subject": rng.choice(("user", "machine", "ip")),
            "allocation_subject_hash": rng.choice(subjects),
            "client_request_id": uuid.uuid4().hex,
            "status_code": 200,
            "has_error": False,
            "error_kind": None,
            "is_stream": True,
            "input_tokens": rng.randint(1, 500),
            "output_tokens": rng.randint(1, 500),
            "ttfb_ms": ttfb,
            "total_ms": ttfb + rng.randint(200, 5000),
        }

    groups = [
        [record(now + timedelta(milliseconds=10 * n)) for n in range(batch_size)]
        for _ in range(batches + 5)
    ]
    for group in groups[:5]:  # warm: prepared statements, the slot cache
        with transaction.atomic():
            rollups.record_requests(group)
    began = time.process_time()
    for group in groups[5:]:
        with transaction.atomic():
            rollups.record_requests(group)
    return (time.process_time() - began) / (batches * batch_size) * 1e6


def deep_cursor(experiment, page: int, page_size: int) -> str:
    """The cursor a reader holds on ``page`` (untimed: found with OFFSET once)."""
    from experiments.models import ExperimentRequest
    from experiments.reports.browser import encode_cursor

    last = (
        ExperimentRequest.objects.filter(variant_version__variant__experiment=experiment)
        .order_by("-created_at", "-usage_id")
        .values_list("created_at", "usage_id")[(page - 1) * page_size - 1]
    )
    return encode_cursor(*last)


def bench_size(rows: int, runs: int, deep_page: int, url: str, started: float) -> dict:
    """Seed ``rows`` requests in a fresh database and time everything; returns figures."""
    from django.db import connection, connections

    from experiments.reports import charts, rollups
    from experiments.reports.browser import BROWSER_PAGE_SIZE, browse_requests
    from experiments.reports.filters import BrowserFilters, ReportFilters
    from experiments.reports.report import experiment_report

    connections.close_all()
    recreate_database(url)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    say(f"{rows:,}: migrated", started)
    experiment = seed(rows, started)
    began = time.perf_counter()
    rollups.rebuild()
    rebuild_s = time.perf_counter() - began
    say(f"{rows:,}: rollups rebuilt in {rebuild_s:.1f} s", started)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")

    def stats(filters=None):
        report = experiment_report(experiment, filters)
        charts.requests_over_time(report.timeseries, report.checkpoints)
        charts.latency_percentiles(report.checkpoints)
        charts.observed_vs_configured_share(report.slots)
        return report

    report = stats()
    assert report.total_requests == rows, (report.total_requests, rows)
    figures = {"rebuild_s": rebuild_s}
    figures["stats, all time"], _ = median_ms(stats, runs)
    last_day = ReportFilters(since=datetime(2025, 1, 7, tzinfo=UTC))
    figures["stats, last day"], _ = median_ms(lambda: stats(last_day), runs)
    machine = ReportFilters(subject_kind="machine")
    figures["stats, machine subjects only"], _ = median_ms(lambda: stats(machine), runs)
    figures["browser, first page"], _ = median_ms(lambda: browse_requests(experiment), runs * 2)
    cursor = deep_cursor(experiment, deep_page, BROWSER_PAGE_SIZE)
    assert len(browse_requests(experiment, cursor=cursor).rows) == BROWSER_PAGE_SIZE
    figures[f"browser, page {deep_page:,}"], _ = median_ms(
        lambda: browse_requests(experiment, cursor=cursor), runs * 2
    )
    errors = BrowserFilters(status="error")
    figures[f"browser, errors only, from page {deep_page:,}"], _ = median_ms(
        lambda: browse_requests(experiment, errors, cursor=cursor), runs * 2
    )
    for batch in (10, 100, 500):
        figures[f"rollup upkeep, batches of {batch}"] = write_cost_us(batch)
    say(f"{rows:,}: timed", started)
    connections.close_all()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--deep-page", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the last bench database")
    args = parser.parse_args()
    started = time.perf_counter()
    url = server_url()
    os.environ["DATABASE_URL"] = with_database(url, BENCH_DATABASE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from experiments import crypto

    os.environ.setdefault("BYOK_ENCRYPTION_KEY", crypto.generate_key())
    import django

    django.setup()
    results = {}
    try:
        for rows in args.rows:
            results[rows] = bench_size(rows, args.runs, args.deep_page, url, started)
    finally:
        if not args.keep:
            drop_database(url)
    sizes = list(results)
    names = [name for name in results[sizes[0]] if name != "rebuild_s"]
    print()
    print(f"{'measure':46}" + "".join(f"{rows:>14,}" for rows in sizes) + "   target")
    for name in names:
        unit = "us/rec" if name.startswith("rollup upkeep") else "ms"
        target = (
            WRITE_TARGET_US
            if unit == "us/rec"
            else PAGE_TARGET_MS
            if name.startswith("browser")
            else STATS_TARGET_MS
        )
        cells = "".join(f"{results[rows][name]:>10.1f} {unit:<3}" for rows in sizes)
        print(f"{name:46}{cells}   <= {target} {unit}")
    print(f"{'rollup rebuild':46}" + "".join(f"{results[r]['rebuild_s']:>12.1f} s" for r in sizes))
    if len(sizes) > 1:
        growth = results[sizes[-1]]["stats, all time"] / results[sizes[0]]["stats, all time"]
        print(
            f"stats all time, {sizes[-1]:,} vs {sizes[0]:,}: {growth:.2f}x "
            f"(target <= {STATS_GROWTH_TARGET}x)"
        )
    say("done", started)


if __name__ == "__main__":
    main()
