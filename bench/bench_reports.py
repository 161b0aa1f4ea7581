"""Report benchmark on PostgreSQL: the same figures at two sizes, side by side.

For each size (default 1,000,000 and 10,000,000 attributed requests over 45 days, i.e.
three monthly partitions; two slots of two checkpoints, each slot hot-swapping once;
errors of five kinds, every subject kind, streamed and not) it seeds a fresh database
with INSERT ... SELECT generate_series (no Python per row; secondary indexes built after
the load, as a restore would), rebuilds the rollups from the raw rows with the
operator's ``manage.py rollups rebuild`` (timed, with its progress bar), then times the
stats page (all time, last day, machine subjects only; cold: nothing is cached,
PostgreSQL's buffers are warm), the request browser (first page, a deep page, errors
only), and the CPU of ``record_requests`` per record on writer-sized batches (in this
process; the gateways' own figure, two processes under load, is bench_rollup_cost.py).
Record the machine's load average alongside: the figures are wall-clock times.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        python bench/bench_reports.py [--rows 1000000 10000000] [--keep]

Targets: stats <= 50 ms at both sizes and the larger within 1.5x of the smaller; any
request-browser page <= 20 ms; rollup upkeep <= 0.1 ms of gateway CPU per record.
"""

# ruff: noqa: S608 - the seed's SQL interpolates only its own fixed text; values are parameters.

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Its own database (another name with BENCH_REPORTS_DATABASE, for parallel runs).
BENCH_DATABASE = os.environ.get("BENCH_REPORTS_DATABASE", "mx_bench_reports")
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


def database_name(rows: int) -> str:
    return f"{BENCH_DATABASE}_{rows}"


def recreate_database(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")


def drop_database(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def use_database(name: str) -> None:
    """Point Django's default connection at database ``name``."""
    from django.conf import settings
    from django.db import connections

    connections.close_all()
    settings.DATABASES["default"]["NAME"] = name
    connections["default"].settings_dict["NAME"] = name


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def median_ms(action, runs: int) -> tuple[float, list[float]]:
    timings = []
    for _ in range(runs):
        began = time.perf_counter()
        action()
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings), timings


#: The seeded traffic: 45 days from mid-December (three monthly partitions), two slots
#: of two checkpoints each, each slot hot-swapping once.
SEED_START = datetime(2024, 12, 20, tzinfo=UTC)
SEED_SPAN = timedelta(days=45)
SEED_CHUNK = 500_000


def _raw_indexes(cursor) -> list[tuple[str, str]]:
    """(name, definition) of the raw tables' secondary indexes (the parents' only: an
    index created on a partitioned table is created on every partition)."""
    cursor.execute(
        """
        SELECT i.relname, pg_get_indexdef(i.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE t.relname IN ('gateway_usage', 'model_experiment_request') AND NOT x.indisprimary
        """
    )
    return cursor.fetchall()


def seed(rows: int, started: float):
    """``rows`` attributed requests, written by the database (generate_series, no Python
    per row) in the shapes the gateway writes: every subject kind, streamed and not,
    errors of several kinds (timeouts without a first byte, a cut stream answered 200),
    retries sharing a client request id and requests without one, a subject always in
    the same slot, latencies and tokens spread per checkpoint.

    As a restore would: the secondary indexes are built after the load and foreign keys
    are not checked row by row (``session_replication_role = replica``; the rows are
    built to satisfy them)."""
    from django.db import connection

    from experiments import crypto
    from experiments.models import Experiment, Variant, VariantVersion
    from experiments.partitions import ensure_partitions, month_start

    start, span = SEED_START, SEED_SPAN
    swap_a, swap_b = start + span * 0.4, start + span * 0.7
    experiment = Experiment.objects.create(
        public_model_id="kilo/preview-bench", name="Bench", status="active", started_at=start
    )
    key = crypto.encrypt_api_key("sk-bench-not-a-real-key")
    slot_a = Variant.objects.create(experiment=experiment, label="slot-a", weight=1)
    slot_b = Variant.objects.create(experiment=experiment, label="slot-b", weight=1)

    def checkpoint(slot, internal_id, effective_at):
        return VariantVersion.objects.create(
            variant=slot,
            upstream={"internal_id": internal_id, "base_url": "https://partner.example/v1"},
            encrypted_api_key=key,
            effective_at=effective_at,
        ).pk

    versions = {
        "a1": checkpoint(slot_a, "rc-alpha-1", start - timedelta(days=1)),
        "a2": checkpoint(slot_a, "rc-alpha-2", swap_a),
        "b1": checkpoint(slot_b, "rc-bravo-1", start - timedelta(days=1)),
        "b2": checkpoint(slot_b, "rc-bravo-2", swap_b),
    }
    # The data's months only (as production holds recent months): empty partitions
    # between then and now would only add planning time to the request browser.
    ensure_partitions(first_month=month_start(start), months_ahead=0, today=(start + span).date())
    params = {
        "start": start,
        "step": span.total_seconds() * 1000 / rows,
        "swap_a": swap_a,
        "swap_b": swap_b,
        # One subject per ~20 requests, at least 50,000.
        "subjects": max(50_000, rows // 20),
        **versions,
    }
    # Per request i: t its time (jittered by up to a second), s its subject (spread at
    # random over time; even subjects are in slot A, odd in slot B), h a hash for the
    # measures, f its fate (8% errors of five kinds, more of them on rc-alpha-2).
    generate = """
        SELECT i, t, s, h, v, (h %% 1000) AS f,
               v = %(a2)s::uuid AS worse, i %% 3 = 0 AS stream
        FROM (
            SELECT i, t, s, h,
                   CASE WHEN s %% 2 = 1 THEN
                            CASE WHEN t < %(swap_b)s THEN %(b1)s::uuid ELSE %(b2)s::uuid END
                        WHEN t < %(swap_a)s THEN %(a1)s::uuid ELSE %(a2)s::uuid END AS v
            FROM (
                SELECT i,
                       %(start)s + ((i * %(step)s) + ((hashint8(-i)::bigint + 2147483648) %% 1000))
                           * interval '1 millisecond' AS t,
                       (hashint8(i)::bigint + 2147483648) %% %(subjects)s AS s,
                       hashint8(i + 7777777)::bigint + 2147483648 AS h
                FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS i
            ) AS g
        ) AS g
    """
    # Measures of a request from its fate: (status, error kind, ttfb, total, output).
    measures = f"""
        SELECT g.*,
               CASE WHEN fate = 'ok' OR fate = 'cut' THEN 200 WHEN fate = 'http_429' THEN 429
                    WHEN fate = 'http_500' THEN 500 WHEN fate = 'timeout' THEN 504
                    ELSE 502 END AS status,
               CASE WHEN fate = 'ok' THEN NULL WHEN fate = 'cut' THEN 'upstream_stream_cut'
                    WHEN fate = 'http_429' THEN 'upstream_http_429'
                    WHEN fate = 'http_500' THEN 'upstream_http_500'
                    WHEN fate = 'timeout' THEN 'upstream_timeout'
                    ELSE 'upstream_unreachable' END AS error_kind,
               50 + (h / 7) %% 4000 AS input,
               CASE WHEN fate IN ('ok', 'cut') THEN 20 + (h / 11) %% 900 ELSE 0 END AS output,
               CASE WHEN fate IN ('timeout', 'unreachable') THEN NULL
                    ELSE (CASE WHEN worse THEN 140 ELSE 90 END)
                         + ((h / 13) %% 300) * ((h / 17) %% 4 + 1) END AS ttfb
        FROM (
            SELECT g.*,
                   CASE WHEN f < 920 - CASE WHEN worse THEN 40 ELSE 0 END THEN 'ok'
                        WHEN f < 940 THEN CASE WHEN stream THEN 'cut' ELSE 'http_500' END
                        WHEN f < 960 THEN 'http_429'
                        WHEN f < 975 THEN 'http_500'
                        WHEN f < 990 THEN 'timeout'
                        ELSE 'unreachable' END AS fate
            FROM ({generate}) AS g
        ) AS g
    """
    # total: the first byte plus ~25 ms per output token (30 s for a timeout).
    rows_sql = f"""
        SELECT m.*,
               CASE WHEN m.error_kind = 'upstream_timeout' THEN 30000
                    WHEN m.ttfb IS NULL THEN 5 + (h / 19) %% 200
                    ELSE m.ttfb + m.output * (15 + (h / 23) %% 20) END AS total
        FROM ({measures}) AS m
    """
    with connection.cursor() as cursor:
        indexes = _raw_indexes(cursor)
        for name, _ in indexes:
            cursor.execute(f"DROP INDEX {name}")
        cursor.execute("SET session_replication_role = replica")
        for low in range(0, rows, SEED_CHUNK):
            high = min(rows, low + SEED_CHUNK) - 1
            cursor.execute(
                f"""
                WITH r AS MATERIALIZED ({rows_sql}),
                usage AS (
                    INSERT INTO gateway_usage (id, created_at, user_id, public_model_id,
                        request_kind, is_stream, status_code, has_error, error_kind,
                        input_tokens, output_tokens, ttfb_ms, total_ms)
                    SELECT md5('u' || i)::uuid, t, NULL, 'kilo/preview-bench',
                           'chat_completions', stream, status, error_kind IS NOT NULL,
                           error_kind, input, output, ttfb, total
                    FROM r
                )
                INSERT INTO model_experiment_request (usage_id, variant_version_id,
                    allocation_subject, allocation_subject_hash, client_request_id,
                    request_kind, request_body_sha256, was_truncated, created_at,
                    status_code, has_error, error_kind, is_stream, input_tokens, output_tokens,
                    ttfb_ms, total_ms)
                SELECT md5('u' || i)::uuid, v,
                       (ARRAY['user', 'user', 'user', 'user', 'user', 'user', 'machine',
                              'machine', 'machine', 'ip'])[1 + (s / 2) %% 10],
                       md5('subject-' || s)::uuid,
                       CASE WHEN i %% 10 = 9 THEN NULL ELSE 'msg-' || (i / 2) END,
                       'chat_completions', md5('body-' || i) || md5('ydob-' || i), false, t,
                       status, error_kind IS NOT NULL, error_kind, stream, input, output,
                       ttfb, total
                FROM r
                """,
                {**params, "low": low, "high": high},
            )
            say(f"seeded {high + 1:,} / {rows:,} requests", started)
        cursor.execute("SET session_replication_role = origin")
        for name, definition in indexes:
            # The parent's definition says ON ONLY (the parent alone); on the whole
            # table it is built on every partition.
            cursor.execute(definition.replace(" ON ONLY ", " ON ", 1))
            say(f"index {name}", started)
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


def build_size(rows: int, url: str, started: float) -> tuple[Any, float]:
    """A fresh database of ``rows`` requests with its rollups rebuilt; (experiment, rebuild
    seconds)."""
    from django.core.management import call_command
    from django.db import connection

    recreate_database(url, database_name(rows))
    use_database(database_name(rows))
    call_command("migrate", verbosity=0)
    say(f"{rows:,}: migrated", started)
    experiment = seed(rows, started)
    began = time.perf_counter()
    # The operator's command, progress bar and all.
    call_command("rollups", "rebuild")
    rebuild_s = time.perf_counter() - began
    say(f"{rows:,}: rollups rebuilt in {rebuild_s:.1f} s (load {load_average():.1f})", started)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    return experiment, rebuild_s


def time_size(rows: int, experiment, runs: int, deep_page: int) -> dict[str, list[float]]:
    """One round of timings on the database of ``rows`` requests (made current here)."""
    from experiments.reports import charts
    from experiments.reports.browser import BROWSER_PAGE_SIZE, browse_requests
    from experiments.reports.filters import BrowserFilters, ReportFilters
    from experiments.reports.report import experiment_report

    use_database(database_name(rows))

    def stats(filters=None):
        report = experiment_report(experiment, filters)
        charts.requests_over_time(report.timeseries, report.checkpoints)
        charts.latency_percentiles(report.checkpoints)
        charts.observed_vs_configured_share(report.slots)
        return report

    report = stats()  # connects; not timed
    assert report.total_requests == rows, (report.total_requests, rows)
    timings = {}
    _, timings["stats, all time"] = median_ms(stats, runs)
    last_day = ReportFilters(since=SEED_START + SEED_SPAN - timedelta(days=1))
    _, timings["stats, last day"] = median_ms(lambda: stats(last_day), runs)
    machine = ReportFilters(subject_kind="machine")
    _, timings["stats, machine subjects only"] = median_ms(lambda: stats(machine), runs)
    _, timings["browser, first page"] = median_ms(lambda: browse_requests(experiment), runs * 2)
    cursor = deep_cursor(experiment, deep_page, BROWSER_PAGE_SIZE)
    assert len(browse_requests(experiment, cursor=cursor).rows) == BROWSER_PAGE_SIZE
    _, timings[f"browser, page {deep_page:,}"] = median_ms(
        lambda: browse_requests(experiment, cursor=cursor), runs * 2
    )
    errors = BrowserFilters(status="error")
    _, timings[f"browser, errors only, from page {deep_page:,}"] = median_ms(
        lambda: browse_requests(experiment, errors, cursor=cursor), runs * 2
    )
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, sizes alternating")
    parser.add_argument("--deep-page", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the bench databases")
    args = parser.parse_args()
    started = time.perf_counter()
    url = server_url()
    os.environ["DATABASE_URL"] = with_database(url, BENCH_DATABASE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from experiments import crypto

    os.environ.setdefault("BYOK_ENCRYPTION_KEY", crypto.generate_key())
    import django

    django.setup()
    results: dict[int, dict[str, float]] = {}
    experiments = {}
    try:
        for rows in args.rows:
            experiments[rows], rebuild_s = build_size(rows, url, started)
            results[rows] = {"rebuild_s": rebuild_s}
        # Timed in alternating rounds, so the sizes share the machine's load alike.
        timings: dict[int, dict[str, list[float]]] = {rows: {} for rows in args.rows}
        loads: list[float] = []
        for number in range(args.rounds):
            order = args.rows if number % 2 == 0 else args.rows[::-1]
            for rows in order:
                loads.append(load_average())
                for name, runs in time_size(
                    rows, experiments[rows], args.runs, args.deep_page
                ).items():
                    timings[rows].setdefault(name, []).extend(runs)
            say(f"timing round {number + 1}/{args.rounds} (load {load_average():.1f})", started)
        for rows in args.rows:
            use_database(database_name(rows))
            results[rows].update(
                {name: statistics.median(runs) for name, runs in timings[rows].items()}
            )
            for batch in (10, 100, 500):
                results[rows][f"rollup upkeep, batches of {batch}"] = write_cost_us(batch)
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            for rows in args.rows:
                drop_database(url, database_name(rows))
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
    print(
        f"load average (1 min) at the timing rounds: min {min(loads):.1f}, "
        f"median {statistics.median(loads):.1f}, max {max(loads):.1f}"
    )
    say("done", started)


if __name__ == "__main__":
    main()
