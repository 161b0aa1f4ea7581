"""Rollups maintained as records land (SPEC §10): what every report reads.

``record_requests(rows)`` takes the attribution rows a writer has just inserted (only
those: a replayed record that was already present is not passed again) and, in the
writer's transaction, adds them to

* ``model_experiment_rollup``: requests, errors, streamed, status classes, tokens,
  the sums behind the exact mean and variance of total latency, and the subjects and
  client request ids first seen, per checkpoint, subject kind and bucket;
* ``model_experiment_rollup_error``: errors by kind, likewise;
* ``model_experiment_rollup_bin``: log-bucket histograms of time to first byte, total
  latency and output throughput (``histogram``), likewise;
* the first-seen tables (``model_experiment_slot_subject``, ``…_checkpoint_subject``,
  ``…_checkpoint_message``): each subject once per slot and per checkpoint, each
  client request id once per checkpoint and month; only a row that is new (or that an
  earlier record arriving late moves back in time) changes a ``new_*`` count.

Every bucket is kept at four resolutions (minute, hour, day, all time), so a report
reads at most ~2×59 minutes + 2×23 hours + the days of its window, or one row set for
all time.

The gateway pays little for this: the batch goes to the database once per statement
as one JSON parameter (encoded in C), and PostgreSQL (or SQLite) computes the buckets
and histogram bins and groups them, so each table gets one multi-row upsert per batch.
(Aggregating in Python and sending typed arrays cost ~150 µs of gateway CPU per record,
mostly in psycopg's array dumping; this costs a few µs: bench/bench_reports.py.)

Many writers: each process adds to rows of its own ``WRITER`` id, so two gateways never
wait on each other's rollup rows (a report sums the writers); ``compact`` folds them
into writer 0. First-seen rows are inserted with ``ON CONFLICT DO NOTHING`` in key
order and only moved by an ``UPDATE`` whose condition is checked before any row is
locked, so a subject active in several processes takes no lock either.
"""

# ruff: noqa: S608 - the SQL here interpolates only table and column names from the
# models' meta and fixed text; every value is a parameter.

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import psycopg
from django.db import connection, models, transaction

from experiments.models import (
    CheckpointMessage,
    CheckpointSubject,
    ErrorKindRollup,
    ExperimentRequest,
    LatencyBin,
    LatencyMetric,
    RequestRollup,
    SlotSubject,
    VariantVersion,
)
from experiments.quality import ERROR_CATEGORIES, FINISH_REASONS
from experiments.reports.histogram import KEY_MULTIPLIER, ZERO_KEY

#: Rows of this process. 0 is the compacted (and rebuilt) share; the rest are random,
#: so processes on any number of hosts need no coordination.
COMPACTED_WRITER = 0
WRITER = secrets.randbelow(2**31 - 1) + 1
#: ``RequestRollup`` sums, in the order the SQL below computes them.
MEASURES = (
    "requests",
    "errors",
    "streamed",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
    "status_other",
    "input_tokens",
    "output_tokens",
    "total_ms_samples",
    "total_ms_sum",
    "total_ms_sum_squares",
    "new_subjects",
    "new_slot_subjects",
    "new_messages",
    *(f"errors_{category}" for category in ERROR_CATEGORIES),
    *(f"finish_{reason}" for reason in FINISH_REASONS),
)
#: An error the gateway recorded without a kind.
UNSPECIFIED_ERROR_KIND = "unspecified"


def _message_digest(client_request_id: str) -> str:
    """Client request ids are kept as the first 16 bytes of their SHA-256 (as hex)."""
    return hashlib.sha256(client_request_id.encode("utf-8", "replace")).hexdigest()[:32]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


# --- the batch as an SQL row source ------------------------------------------------

#: The columns of the batch's rows ``src``: (name, PostgreSQL type). One JSON array per
#: request, in this order; UUIDs as 32 hex digits (SQLite stores them so).
_SOURCE = (
    ("v", "uuid"),  # checkpoint
    ("slot", "uuid"),
    ("kind", "text"),  # subject kind
    ("e", "bigint"),  # created_at, epoch seconds
    ("t", "timestamptz"),  # created_at
    ("h", "uuid"),  # subject pseudonym
    ("m", "uuid"),  # _message_digest(client request id)
    ("mo", "date"),  # month of created_at (UTC)
    ("st", "integer"),
    ("er", "boolean"),
    ("ek", "text"),
    ("str", "boolean"),
    ("i", "bigint"),
    ("o", "bigint"),
    ("tf", "bigint"),
    ("tt", "bigint"),
    ("ec", "text"),  # error category
    ("fr", "text"),  # finish reason
)
#: First-seen changes: [checkpoint, kind, epoch, subjects, slot subjects, messages].
_DELTAS = (("v", "uuid"), ("kind", "text"), ("e", "bigint"))
_DELTA_MEASURES = ("ns", "nss", "nm")


def _json_rows(name: str, param: str, columns) -> str:
    """A CTE ``name`` of the rows of a JSON array-of-arrays parameter."""
    if connection.vendor == "postgresql":
        picked = ", ".join(f"(r->>{i})::{kind} AS {col}" for i, (col, kind) in enumerate(columns))
        # jsonb: each element is parsed once, not once per column read from it.
        return f"{name} AS (SELECT {picked} FROM jsonb_array_elements(%({param})s::jsonb) AS r)"
    picked = ", ".join(
        f"json_extract(value, '$[{i}]') AS {col}" for i, (col, _) in enumerate(columns)
    )
    return f"{name} AS (SELECT {picked} FROM json_each(%({param})s))"


def _timestamp(moment: datetime) -> str:
    if connection.vendor == "postgresql":
        return moment.isoformat()
    return str(connection.ops.adapt_datetimefield_value(moment))


_slot_of_version: dict[uuid.UUID, uuid.UUID] = {}


def _slots_of(versions: set[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """Slot of each checkpoint. Kept for the process: a checkpoint never changes slot."""
    missing = versions - _slot_of_version.keys()
    if missing:
        _slot_of_version.update(
            VariantVersion.objects.filter(pk__in=missing).values_list("pk", "variant_id")
        )
    return _slot_of_version


def _batch_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """The batch as the JSON of ``_SOURCE`` rows. Runs on the gateway for every record:
    kept to a few µs a row (no UUID objects or timezone conversions per row)."""
    hexes: dict[Any, tuple[str, str]] = {}
    for row in rows:
        version = row["variant_version_id"]
        if version not in hexes:
            hexes[version] = (_uuid(version), "")
    slots = _slots_of({version for version, _ in hexes.values()})
    hexes = {key: (version.hex, slots[version].hex) for key, (version, _) in hexes.items()}
    postgres = connection.vendor == "postgresql"
    encoded = []
    for row in rows:
        version, slot = hexes[row["variant_version_id"]]
        created_at = row["created_at"]
        if created_at.utcoffset():
            created_at = created_at.astimezone(UTC)
        stamp = created_at.isoformat() if postgres else _timestamp(created_at)
        subject = row["allocation_subject_hash"]
        client_request_id = row["client_request_id"]
        encoded.append(
            [
                version,
                slot,
                row["allocation_subject"],
                int(created_at.timestamp() // 1),
                stamp,
                (subject.hex if isinstance(subject, uuid.UUID) else _uuid(subject).hex)
                if subject is not None
                else None,
                _message_digest(client_request_id) if client_request_id is not None else None,
                stamp[:7] + "-01",  # month_of(created_at): the stamp is in UTC
                row["status_code"],
                bool(row["has_error"]),
                row["error_kind"],
                bool(row["is_stream"]),
                row["input_tokens"],
                row["output_tokens"],
                row["ttfb_ms"],
                row["total_ms"],
                row["error_category"],
                row["finish_reason"],
            ]
        )
    return json.dumps(encoded, separators=(",", ":"))


# --- statements ---------------------------------------------------------------------
#
# Each statement reads the batch as ``src`` (and the first-seen changes as ``d``).
# SQLite runs them one by one; PostgreSQL runs each phase as one statement, the
# statements as data-modifying CTEs: three round trips a batch.

#: Every bucket at every resolution: each source row counts once per resolution.
_LEVELS = (60, 3600, 86400, 0)
#: Histograms start at hours: per minute their bins would outnumber the requests at
#: high traffic (hundreds of bins a minute per checkpoint and kind).
_HISTOGRAM_LEVELS = (3600, 86400, 0)
#: What ``rebuild`` writes from the raw rows a day at a time: the buckets a day
#: completes. All time is summed from the days afterwards (``_coarser_sql``): adding
#: each step to it as it goes would update the same rows once a step, all in one
#: transaction, each update leaving a row version nothing can prune until it commits.
_REBUILD_LEVELS = (60, 3600, 86400)
_REBUILD_HISTOGRAM_LEVELS = (3600, 86400)


def _levels(resolutions: Sequence[int]) -> str:
    """The resolutions as a row source ``l(res)``."""
    first, *rest = resolutions
    return (
        "("
        + " UNION ALL ".join([f"SELECT {first} AS res", *(f"SELECT {r}" for r in rest)])
        + ") AS l"
    )


_BUCKET = "CASE WHEN l.res = 0 THEN 0 ELSE x.e - x.e %% l.res END"  # %% is a literal %


def _sum_updates(table: str, sums: Sequence[str], *, with_times: bool) -> list[str]:
    """``ON CONFLICT DO UPDATE`` assignments adding ``excluded``'s sums to the row's."""
    updates = [f"{c} = {table}.{c} + excluded.{c}" for c in sums]
    if with_times:
        # LEAST/GREATEST would skip NULLs on PostgreSQL but not on SQLite.
        updates += [
            f"first_request_at = CASE WHEN excluded.first_request_at IS NULL "
            f"OR {table}.first_request_at < excluded.first_request_at "
            f"THEN {table}.first_request_at ELSE excluded.first_request_at END",
            f"last_request_at = CASE WHEN excluded.last_request_at IS NULL "
            f"OR {table}.last_request_at > excluded.last_request_at "
            f"THEN {table}.last_request_at ELSE excluded.last_request_at END",
        ]
    return updates


def _pk_columns(model: type[models.Model]) -> list[str]:
    return [f.column for f in model._meta.pk_fields]


def _upsert(model: type[models.Model], columns: Sequence[str], select: str, sums) -> str:
    table = model._meta.db_table
    with_times = "first_request_at" in columns
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) {select} "
        f"ON CONFLICT ({', '.join(_pk_columns(model))}) "
        f"DO UPDATE SET {', '.join(_sum_updates(table, sums, with_times=with_times))}"
    )


#: ``RequestRollup`` counts of one category each: (measure, condition on a ``src`` row).
#: Errors by category; finish reasons of successful answers only (an error's partial
#: answer has no say in how answers end).
_CATEGORY_COUNTS = (
    *((f"errors_{c}", f"src.er AND src.ec = '{c}'") for c in ERROR_CATEGORIES),
    *((f"finish_{r}", f"NOT src.er AND src.fr = '{r}'") for r in FINISH_REASONS),
)


def _counts_sql(levels: Sequence[int] = _LEVELS) -> str:
    """Counts and sums per checkpoint, kind and bucket, and the first-seen changes ``d``."""
    classes = ", ".join(
        f"CASE WHEN src.st >= {low} AND src.st < {low + 100} THEN 1 ELSE 0 END AS s{low // 100}"
        for low in (200, 300, 400, 500)
    )
    categories = ", ".join(
        f"CASE WHEN {condition} THEN 1 ELSE 0 END AS {name}" for name, condition in _CATEGORY_COUNTS
    )
    category_sums = ", ".join(f"SUM(x.{name})" for name, _ in _CATEGORY_COUNTS)
    no_categories = ", ".join("0" for _ in _CATEGORY_COUNTS)
    select = (
        f"SELECT x.v, x.kind, l.res, {_BUCKET}, %(writer)s, SUM(x.n), SUM(x.er), SUM(x.str), "
        "SUM(x.s2), SUM(x.s3), SUM(x.s4), SUM(x.s5), SUM(x.n - x.s2 - x.s3 - x.s4 - x.s5), "
        "SUM(x.i), SUM(x.o), SUM(x.ts), SUM(x.tt), SUM(x.tt2), "
        f"SUM(x.ns), SUM(x.nss), SUM(x.nm), {category_sums}, MIN(x.t), MAX(x.t) FROM ("
        "SELECT src.v, src.kind, src.e, src.t, 1 AS n, "
        "CASE WHEN src.er THEN 1 ELSE 0 END AS er, CASE WHEN src.str THEN 1 ELSE 0 END AS str, "
        f"{classes}, src.i, src.o, CASE WHEN src.tt IS NULL THEN 0 ELSE 1 END AS ts, "
        "COALESCE(src.tt, 0) AS tt, "
        "CAST(COALESCE(src.tt, 0) AS NUMERIC) * COALESCE(src.tt, 0) AS tt2, "
        f"0 AS ns, 0 AS nss, 0 AS nm, {categories} FROM src "
        "UNION ALL SELECT d.v, d.kind, d.e, NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "
        f"d.ns, d.nss, d.nm, {no_categories} FROM d"
        f") AS x CROSS JOIN {_levels(levels)} WHERE true GROUP BY x.v, x.kind, l.res, {_BUCKET}"
    )
    columns = [
        "variant_version_id",
        "allocation_subject",
        "resolution",
        "bucket",
        "writer",
        *MEASURES,
        "first_request_at",
        "last_request_at",
    ]
    return _upsert(RequestRollup, columns, select, MEASURES)


def _errors_sql(levels: Sequence[int] = _LEVELS) -> str:
    select = (
        f"SELECT x.v, x.kind, l.res, {_BUCKET}, x.ek, %(writer)s, COUNT(*) "
        "FROM (SELECT src.v, src.kind, src.e, "
        f"COALESCE(src.ek, '{UNSPECIFIED_ERROR_KIND}') AS ek FROM src WHERE src.er) AS x "
        f"CROSS JOIN {_levels(levels)} WHERE true GROUP BY x.v, x.kind, l.res, {_BUCKET}, x.ek"
    )
    columns = [
        "variant_version_id",
        "allocation_subject",
        "resolution",
        "bucket",
        "error_kind",
        "writer",
        "count",
    ]
    return _upsert(ErrorKindRollup, columns, select, ("count",))


def _bins_sql(levels: Sequence[int] = _HISTOGRAM_LEVELS) -> str:
    """Histogram bins: ``histogram.key_of`` in SQL, so the database computes and groups
    the keys."""
    value = "CAST(m.value AS DOUBLE PRECISION)"
    key = (
        f"CASE WHEN m.value <= 0 THEN {ZERO_KEY} "
        f"ELSE CAST(CEILING(LN({value}) * %(multiplier)s) AS INTEGER) END"
    )
    metrics = (
        f"SELECT src.v, src.kind, src.e, {int(LatencyMetric.TTFB)} AS metric, src.tf AS value "
        "FROM src WHERE src.tf IS NOT NULL "
        f"UNION ALL SELECT src.v, src.kind, src.e, {int(LatencyMetric.TOTAL)}, src.tt "
        "FROM src WHERE src.tt IS NOT NULL "
        # Output throughput: tokens per second after the first byte.
        f"UNION ALL SELECT src.v, src.kind, src.e, {int(LatencyMetric.THROUGHPUT)}, "
        "src.o * 1000.0 / (src.tt - src.tf) "
        "FROM src WHERE src.o > 0 AND src.tf IS NOT NULL AND src.tt > src.tf"
    )
    select = (
        f"SELECT x.v, x.kind, l.res, {_BUCKET}, x.metric, x.key, %(writer)s, COUNT(*) "
        f"FROM (SELECT m.v, m.kind, m.e, m.metric, {key} AS key FROM ({metrics}) AS m) AS x "
        f"CROSS JOIN {_levels(levels)} WHERE true "
        f"GROUP BY x.v, x.kind, l.res, {_BUCKET}, x.metric, x.key"
    )
    columns = [
        "variant_version_id",
        "allocation_subject",
        "resolution",
        "bucket",
        "metric",
        "key",
        "writer",
        "count",
    ]
    return _upsert(LatencyBin, columns, select, ("count",))


# --- first-seen tables ------------------------------------------------------------------


def _epoch(column: str) -> str:
    """A timestamp column as whole epoch seconds (cheaper to return than a timestamp)."""
    if connection.vendor == "postgresql":
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM {column})) AS BIGINT)"
    return f"CAST(strftime('%%s', {column}) AS INTEGER)"


@dataclass(frozen=True)
class _FirstSeenTable:
    """A first-seen table: its key (table column, source column), and which ``new_*``
    count (``d`` column) its new rows add to."""

    model: type[models.Model]
    key: tuple[tuple[str, str], ...]
    measure: str
    #: Whether the credited checkpoint moves with first_seen_at (per slot: a late earlier
    #: record may have been served by another checkpoint of the slot).
    credit_moves: bool = False

    def _earliest(self) -> str:
        """The batch's keys, each with its earliest request."""
        sources = [source for _, source in self.key]
        picked = ", ".join(dict.fromkeys([*sources, "kind", "t", "v"]))
        not_null = " AND ".join(f"src.{source} IS NOT NULL" for source in sources)
        return (
            f"SELECT {picked} FROM (SELECT src.*, ROW_NUMBER() OVER (PARTITION BY "
            f"{', '.join(f'src.{s}' for s in sources)} ORDER BY src.t, src.v) AS n "
            f"FROM src WHERE {not_null}) AS c WHERE n = 1"
        )

    def insert_sql(self) -> str:
        """Insert-if-absent, in key order (two writers inserting the same new keys then
        cannot deadlock); returns the new rows."""
        columns = [column for column, _ in self.key]
        sources = [source for _, source in self.key]
        extra = [] if "variant_version_id" in columns else [("variant_version_id", "v")]
        names = [*columns, "allocation_subject", "first_seen_at", *(c for c, _ in extra)]
        values = [*sources, "kind", "t", *(s for _, s in extra)]
        return (
            f"INSERT INTO {self.model._meta.db_table} ({', '.join(names)}) "
            f"SELECT {', '.join(values)} FROM ({self._earliest()}) AS e WHERE true "
            f"ORDER BY {', '.join(sources)} ON CONFLICT DO NOTHING "
            f"RETURNING '{self.measure}', variant_version_id, allocation_subject, "
            f"{_epoch('first_seen_at')}"
        )

    def move_sql(self) -> str:
        """Move back in time the rows this batch saw earlier. The condition is checked on
        each row before it is locked, so the usual case locks nothing. Returns the
        moved rows, with where they were."""
        table = self.model._meta.db_table
        moves = [
            f"previous_first_seen_at = {table}.first_seen_at",
            "first_seen_at = e.t",
            f"previous_allocation_subject = {table}.allocation_subject",
            "allocation_subject = e.kind",
        ]
        previous_version = "variant_version_id"
        if self.credit_moves:
            moves += [
                f"previous_variant_version_id = {table}.variant_version_id",
                "variant_version_id = e.v",
            ]
            previous_version = "previous_variant_version_id"
        matches = " AND ".join(f"{table}.{c} = e.{s}" for c, s in self.key)
        return (
            f"UPDATE {table} SET {', '.join(moves)} FROM ({self._earliest()}) AS e "
            f"WHERE {matches} AND e.t < {table}.first_seen_at "
            f"RETURNING '{self.measure}', variant_version_id, allocation_subject, "
            f"{_epoch('first_seen_at')}, {previous_version}, previous_allocation_subject, "
            f"{_epoch('previous_first_seen_at')}"
        )


_FIRST_SEEN = (
    # Slot first: every writer takes the tables (and the keys) in the same order.
    _FirstSeenTable(
        SlotSubject, (("variant_id", "slot"), ("subject_hash", "h")), "nss", credit_moves=True
    ),
    _FirstSeenTable(CheckpointSubject, (("variant_version_id", "v"), ("subject_hash", "h")), "ns"),
    _FirstSeenTable(
        CheckpointMessage,
        (("month", "mo"), ("variant_version_id", "v"), ("message_hash", "m")),
        "nm",
    ),
)


def _statements(ctes: Sequence[str], statements: Sequence[str], returning: bool) -> list[str]:
    """The statements, each reading ``ctes``: one by one on SQLite, or as one statement
    on PostgreSQL (data-modifying CTEs; with ``returning``, the union of their rows)."""
    if connection.vendor != "postgresql":
        return [f"WITH {', '.join(ctes)} {statement}" for statement in statements]
    named = [f"s{index} AS ({statement})" for index, statement in enumerate(statements)]
    if returning:
        tail = " UNION ALL ".join(f"SELECT * FROM s{index}" for index in range(len(statements)))
    else:
        tail = "SELECT 1"
    return [f"WITH {', '.join([*ctes, *named])} {tail}"]


def _raw_rows() -> str:
    """``src`` read from the attribution rows of [%(since)s, %(until)s) instead of a batch:
    the same columns, computed as ``_batch_json`` computes them (for ``rebuild``)."""
    table = ExperimentRequest._meta.db_table
    versions = VariantVersion._meta.db_table
    if connection.vendor == "postgresql":
        epoch = "CAST(FLOOR(EXTRACT(EPOCH FROM r.created_at)) AS BIGINT)"
        digest = (
            "CAST(SUBSTR(ENCODE(SHA256(CONVERT_TO(r.client_request_id, 'UTF8')), 'hex'), 1, 32) "
            "AS UUID)"
        )
        month = "CAST(DATE_TRUNC('month', r.created_at AT TIME ZONE 'UTC') AS DATE)"
    else:
        epoch = "CAST(strftime('%%s', r.created_at) AS INTEGER)"
        digest = "SUBSTR(SHA256(r.client_request_id), 1, 32)"
        month = "strftime('%%Y-%%m-01', r.created_at)"
    return (
        f"src AS (SELECT r.variant_version_id AS v, vv.variant_id AS slot, "
        f"r.allocation_subject AS kind, {epoch} AS e, r.created_at AS t, "
        f"r.allocation_subject_hash AS h, {digest} AS m, {month} AS mo, r.status_code AS st, "
        "r.has_error AS er, r.error_kind AS ek, r.is_stream AS str, r.input_tokens AS i, "
        "r.output_tokens AS o, r.ttfb_ms AS tf, r.total_ms AS tt, "
        "r.error_category AS ec, r.finish_reason AS fr "
        f"FROM {table} r JOIN {versions} vv ON vv.id = r.variant_version_id "
        "WHERE r.created_at >= %(since)s AND r.created_at < %(until)s)"
    )


def _deltas_rows() -> str:
    return _json_rows("d", "deltas", [*_DELTAS, *((name, "bigint") for name in _DELTA_MEASURES)])


@lru_cache(maxsize=2)
def _phases(vendor: str) -> tuple[list[str], list[str], list[str]]:
    """(insert first-seen rows, move first-seen rows, add to the rollups), per vendor,
    reading a writer's batch."""
    rows = _json_rows("src", "batch", _SOURCE)
    return (
        _statements([rows], [table.insert_sql() for table in _FIRST_SEEN], returning=True),
        _statements([rows], [table.move_sql() for table in _FIRST_SEEN], returning=True),
        _statements(
            [rows, _deltas_rows()], [_counts_sql(), _errors_sql(), _bins_sql()], returning=False
        ),
    )


@lru_cache(maxsize=2)
def _rebuild_phases(vendor: str) -> tuple[list[str], list[str]]:
    """(insert first-seen rows, add to the rollups) for the attribution rows of
    [%(since)s, %(until)s): the writers' statements, at the resolutions a day completes.

    On PostgreSQL one statement, in which the first-seen rows inserted (``RETURNING``)
    are the first-seen changes ``d`` the rollups add, counted by the database; the first
    phase is then empty. On SQLite the changes go through Python as for a writer."""
    rows = _raw_rows()
    inserts = [table.insert_sql() for table in _FIRST_SEEN]
    adds = [
        _counts_sql(_REBUILD_LEVELS),
        _errors_sql(_REBUILD_LEVELS),
        _bins_sql(_REBUILD_HISTOGRAM_LEVELS),
    ]
    if vendor != "postgresql":
        return (
            _statements([rows], inserts, returning=True),
            _statements([rows, _deltas_rows()], adds, returning=False),
        )
    firsts = [f"f{index} AS ({insert})" for index, insert in enumerate(inserts)]
    returned = " UNION ALL ".join(f"SELECT * FROM f{index}" for index in range(len(inserts)))
    sums = ", ".join(
        f"SUM(CASE WHEN f.measure = '{name}' THEN 1 ELSE 0 END) AS {name}"
        for name in _DELTA_MEASURES
    )
    deltas = (
        f"d AS (SELECT f.v, f.kind, f.e, {sums} FROM ({returned}) AS f(measure, v, kind, e) "
        "GROUP BY f.v, f.kind, f.e)"
    )
    return [], _statements([rows, *firsts, deltas], adds, returning=False)


def _coarser_sql(model: type[models.Model], source: int, target: int) -> str:
    """Writer 0's rows at resolution ``target`` summed from its rows at ``source``."""
    sums, with_times = _SUMMED[model]
    key = [c for c in _pk_columns(model) if c != "writer"]
    bucket = "0" if target == 0 else f"(bucket / {target}) * {target}"
    picked = [str(target) if c == "resolution" else bucket if c == "bucket" else c for c in key]
    grouped = [c for c in key if c not in ("resolution", "bucket")] + ([bucket] if target else [])
    totals = [f"SUM({c})" for c in sums]
    times = ["first_request_at", "last_request_at"] if with_times else []
    if with_times:
        totals += ["MIN(first_request_at)", "MAX(last_request_at)"]
    select = (
        f"SELECT {', '.join(picked)}, {COMPACTED_WRITER}, {', '.join(totals)} "
        f"FROM {model._meta.db_table} WHERE resolution = {source} "
        f"AND writer = {COMPACTED_WRITER} GROUP BY {', '.join(grouped)}"
    )
    return _upsert(model, [*key, "writer", *sums, *times], select, sums)


def _run(statements: list[str], params: dict[str, Any]) -> list[tuple]:
    returned: list[tuple] = []
    with _cursor() as cursor:
        for statement in statements:
            cursor.execute(statement, params)
            if cursor.description is not None:
                returned += cursor.fetchall()
    return returned


@contextmanager
def _cursor() -> Iterator[Any]:
    """On PostgreSQL a psycopg cursor binding parameters server-side: the same few
    statements every batch are then prepared once per connection, and the JSON is sent
    as is rather than escaped into the query text (Django's default cursor did both
    every time: ~0.3 ms of gateway CPU a statement)."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            yield cursor
        return
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


def _deltas_json(inserted: list[tuple], moved: list[tuple]) -> str:
    position = {name: 3 + index for index, name in enumerate(_DELTA_MEASURES)}
    encoded = []

    def change(measure: str, version: Any, kind: str, at: Any, delta: int) -> None:
        entry = [_uuid(version).hex, kind, at, 0, 0, 0]
        entry[position[measure]] = delta
        encoded.append(entry)

    for measure, version, kind, at in inserted:
        change(measure, version, kind, at, 1)
    for measure, version, kind, at, previous_version, previous_kind, previous_at in moved:
        change(measure, previous_version, previous_kind, previous_at, -1)
        change(measure, version, kind, at, 1)
    return json.dumps(encoded, separators=(",", ":"))


# --- the writer's entry point ------------------------------------------------------------


def record_requests(rows: Sequence[Mapping[str, Any]], *, writer: int | None = None) -> None:
    """Add attribution rows just inserted to the rollups, in the caller's transaction.

    ``rows`` map ``ExperimentRequest`` attnames to values (a dict per row, or a model
    instance's ``__dict__``); each row must be passed once, when it is first inserted.
    ``writer`` defaults to this process's ``WRITER``.
    """
    if not rows:
        return
    insert, move, add = _phases(connection.vendor)
    params = {
        "batch": _batch_json(rows),
        "writer": WRITER if writer is None else writer,
        "multiplier": KEY_MULTIPLIER,
    }
    with transaction.atomic(savepoint=False):
        inserted = _run(insert, params)
        # A statement of its own: it sees the rows other writers committed meanwhile.
        moved = _run(move, params)
        _run(add, {**params, "deltas": _deltas_json(inserted, moved)})


# --- rebuild and compaction ------------------------------------------------------------------

ROLLUP_MODELS = (RequestRollup, ErrorKindRollup, LatencyBin)
FIRST_SEEN_MODELS = (SlotSubject, CheckpointSubject, CheckpointMessage)
#: Rebuild reads the attribution rows a day (UTC) at a time, in time order: few enough
#: statements that planning them costs nothing next to the rows (an hour at a time,
#: planning took ~20% of a rebuild), small enough to group in memory.
REBUILD_STEP = timedelta(days=1)

ProgressCallback = Callable[[int, int], None]


def rebuild(*, progress: ProgressCallback | None = None) -> int:
    """Every rollup and first-seen row again from the attribution rows; returns how many
    rows were read.

    One transaction that locks the writers out of the rollup tables until it commits
    (their records wait in the spool), so a row committed meanwhile is counted either
    here or by its writer afterwards, never both; reports read the old rollups
    meanwhile. The rows go through the writers' own statements, as writer 0, a day
    of rows at a time in time order, read by the database itself (no row travels to
    Python): each key is first seen in the earliest day that has it, so nothing needs
    moving back. A day writes its minutes, hours and day; all time is summed from the
    days at the end (the same sums). ``progress`` gets (days done, days).
    """
    report = progress or (lambda done, total: None)
    insert, add = _rebuild_phases(connection.vendor)
    with transaction.atomic():
        tables = [m._meta.db_table for m in (*ROLLUP_MODELS, *FIRST_SEEN_MODELS)]
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                # Holds off the writers (and waits for their open transactions); readers
                # keep reading the old rollups until this commits.
                cursor.execute(f"LOCK TABLE {', '.join(tables)} IN SHARE ROW EXCLUSIVE MODE")
                # Sorting and grouping a day of rows in memory rather than on disk.
                cursor.execute("SET LOCAL work_mem = '256MB'")
            for table in tables:
                cursor.execute(f"DELETE FROM {table}")
        span = ExperimentRequest.objects.aggregate(
            first=models.Min("created_at"), last=models.Max("created_at"), rows=models.Count("*")
        )
        if span["first"] is None:
            report(0, 0)
            return 0
        start = span["first"].astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        steps = int((span["last"] - start) / REBUILD_STEP) + 1
        report(0, steps)
        for step in range(steps):
            since = start + step * REBUILD_STEP
            params = {
                "since": since,
                "until": since + REBUILD_STEP,
                "writer": COMPACTED_WRITER,
                "multiplier": KEY_MULTIPLIER,
            }
            if insert:
                params["deltas"] = _deltas_json(_run(insert, params), [])
            _run(add, params)
            report(step + 1, steps)
        # All time from the days: the sums the writers keep.
        with connection.cursor() as cursor:
            for model in ROLLUP_MODELS:
                cursor.execute(_coarser_sql(model, 86400, 0))
    return span["rows"]


#: Rows moved per transaction by ``compact`` (PostgreSQL): short transactions, so a
#: writer replaying old buckets never waits long.
COMPACT_BATCH = 50_000
_SUMMED = {
    RequestRollup: (MEASURES, True),
    ErrorKindRollup: (("count",), False),
    LatencyBin: (("count",), False),
}


def compact() -> int:
    """Fold every writer's rollup rows into writer 0's; returns how many rows were folded.

    Reports read the same sums before and after; they read fewer rows after (one share
    per bucket instead of one per gateway process that ever wrote to it). Rows a writer
    has locked in an open transaction are skipped (left for the next run), so neither
    side ever waits for the other.
    """
    folded = 0
    for model, (sums, with_times) in _SUMMED.items():
        table = model._meta.db_table
        key = [c for c in _pk_columns(model) if c != "writer"]
        totals = [f"SUM({c})" for c in sums]
        if with_times:
            totals += ["MIN(first_request_at)", "MAX(last_request_at)"]
        columns = [*key, "writer", *sums] + (
            ["first_request_at", "last_request_at"] if with_times else []
        )
        upsert = (
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"SELECT {', '.join(key)}, {COMPACTED_WRITER}, {', '.join(totals)} "
            f"FROM {{source}} WHERE true GROUP BY {', '.join(key)} "
            f"ON CONFLICT ({', '.join(_pk_columns(model))}) "
            f"DO UPDATE SET {', '.join(_sum_updates(table, sums, with_times=with_times))}"
        )
        while True:
            with transaction.atomic(), connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    cursor.execute(
                        f"WITH moved AS (DELETE FROM {table} WHERE ctid IN ("
                        f"SELECT ctid FROM {table} WHERE writer <> {COMPACTED_WRITER} "
                        f"LIMIT {COMPACT_BATCH} FOR UPDATE SKIP LOCKED) RETURNING *), "
                        f"folded AS ({upsert.format(source='moved')} RETURNING 1) "
                        "SELECT count(*) FROM moved"
                    )
                    moved = cursor.fetchone()[0]
                else:
                    # One writer at a time on SQLite: the copy and the delete cannot interleave.
                    source = f"(SELECT * FROM {table} WHERE writer <> {COMPACTED_WRITER})"
                    cursor.execute(upsert.format(source=source))
                    cursor.execute(f"DELETE FROM {table} WHERE writer <> {COMPACTED_WRITER}")
                    moved = cursor.rowcount
            folded += moved
            if connection.vendor != "postgresql" or moved < COMPACT_BATCH:
                break
    return folded
