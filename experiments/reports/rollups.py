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
all time. Aggregation happens here, per batch, and each table gets one multi-row
upsert: the gateway's extra CPU is a few µs per request.

Many writers: each process adds to rows of its own ``WRITER`` id, so two gateways never
wait on each other's rollup rows (a report sums the writers); ``compact`` folds them
into writer 0. First-seen rows are inserted with ``ON CONFLICT DO NOTHING`` in key
order and only moved by an ``UPDATE`` whose condition is checked before any row is
locked, so a subject active in several processes takes no lock either.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from django.db import connection, models, transaction
from django.utils.dateparse import parse_datetime

from experiments.models import (
    USAGE_MEASURES,
    CheckpointMessage,
    CheckpointSubject,
    ErrorKindRollup,
    ExperimentRequest,
    LatencyBin,
    LatencyMetric,
    RequestRollup,
    RollupResolution,
    SlotSubject,
    VariantVersion,
)
from experiments.reports.histogram import key_of

#: Rows of this process. 0 is the compacted (and rebuilt) share; the rest are random,
#: so processes on any number of hosts need no coordination.
COMPACTED_WRITER = 0
WRITER = secrets.randbelow(2**31 - 1) + 1
RESOLUTIONS = (
    RollupResolution.MINUTE,
    RollupResolution.HOUR,
    RollupResolution.DAY,
    RollupResolution.ALL,
)
#: ``RequestRollup`` measures in the order the aggregation keeps them.
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
)
_STATUS_COLUMN = {2: 3, 3: 4, 4: 5, 5: 6}
_OTHER_STATUS = 7
_NEW_SUBJECTS, _NEW_SLOT_SUBJECTS, _NEW_MESSAGES = 13, 14, 15
#: An error the gateway recorded without a kind.
UNSPECIFIED_ERROR_KIND = "unspecified"


def bucket_of(epoch: int, resolution: int) -> int:
    return epoch - epoch % resolution if resolution else 0


def epoch_of(moment: datetime) -> int:
    return int(moment.timestamp() // 1)


def month_of(moment: datetime) -> date:
    moment = moment.astimezone(UTC)
    return date(moment.year, moment.month, 1)


def message_hash(client_request_id: str) -> uuid.UUID:
    """Client request ids are kept as the first 16 bytes of their SHA-256."""
    return uuid.UUID(
        bytes=hashlib.sha256(client_request_id.encode("utf-8", "replace")).digest()[:16]
    )


def throughput_of(output_tokens: int, ttfb_ms: int | None, total_ms: int | None) -> float | None:
    """Output tokens per second after the first byte; None when it does not apply (no
    tokens, no first byte, or nothing measured after it)."""
    if not output_tokens or ttfb_ms is None or total_ms is None or total_ms <= ttfb_ms:
        return None
    return output_tokens * 1000 / (total_ms - ttfb_ms)


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _moment(value: Any) -> datetime:
    """A timestamp as the database returned it (a string on SQLite), aware, in UTC."""
    if isinstance(value, str):
        value = parse_datetime(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


# --- aggregation ----------------------------------------------------------------------


@dataclass
class _Aggregate:
    """A batch's contribution, at minute resolution until ``_rows`` spreads it out."""

    #: (version, subject kind, minute) -> MEASURES values + [first, last request]
    counts: dict[tuple, list] = field(default_factory=dict)
    #: (version, subject kind, minute, error kind) -> count
    errors: dict[tuple, int] = field(default_factory=dict)
    #: (version, subject kind, minute, metric, key) -> count
    bins: dict[tuple, int] = field(default_factory=dict)

    def measures(self, version: uuid.UUID, kind: str, minute: int) -> list:
        key = (version, kind, minute)
        values = self.counts.get(key)
        if values is None:
            values = self.counts[key] = [0] * len(MEASURES) + [None, None]
        return values

    def add_request(self, row: Mapping[str, Any]) -> None:
        version = _uuid(row["variant_version_id"])
        kind = row["allocation_subject"]
        created_at = row["created_at"]
        minute = bucket_of(epoch_of(created_at), RollupResolution.MINUTE)
        values = self.measures(version, kind, minute)
        values[0] += 1
        status = row["status_code"]
        if row["has_error"]:
            values[1] += 1
            error = (version, kind, minute, row["error_kind"] or UNSPECIFIED_ERROR_KIND)
            self.errors[error] = self.errors.get(error, 0) + 1
        if row["is_stream"]:
            values[2] += 1
        values[_STATUS_COLUMN.get(status // 100, _OTHER_STATUS)] += 1
        values[8] += row["input_tokens"]
        values[9] += row["output_tokens"]
        ttfb, total = row["ttfb_ms"], row["total_ms"]
        if total is not None:
            values[10] += 1
            values[11] += total
            values[12] += total * total
            self._add_bin(version, kind, minute, LatencyMetric.TOTAL, total)
        if ttfb is not None:
            self._add_bin(version, kind, minute, LatencyMetric.TTFB, ttfb)
        throughput = throughput_of(row["output_tokens"], ttfb, total)
        if throughput is not None:
            self._add_bin(version, kind, minute, LatencyMetric.THROUGHPUT, throughput)
        first, last = values[-2], values[-1]
        if first is None or created_at < first:
            values[-2] = created_at
        if last is None or created_at > last:
            values[-1] = created_at

    def _add_bin(self, version, kind, minute, metric, value) -> None:
        key = (version, kind, minute, metric, key_of(value))
        self.bins[key] = self.bins.get(key, 0) + 1

    def add_first_seen(
        self, measure: int, version: uuid.UUID, kind: str, at: datetime, delta: int
    ) -> None:
        minute = bucket_of(epoch_of(at), RollupResolution.MINUTE)
        self.measures(version, kind, minute)[measure] += delta


def _spread(entries: dict[tuple, Any], merge: Callable[[Any, Any], Any]) -> dict[tuple, Any]:
    """Minute-level entries (key[2] is the minute) at every resolution: key[2] becomes
    (resolution, bucket)."""
    spread: dict[tuple, Any] = {}
    for key, value in entries.items():
        for resolution in RESOLUTIONS:
            wide = (*key[:2], int(resolution), bucket_of(key[2], resolution), *key[3:])
            spread[wide] = merge(spread[wide], value) if wide in spread else value
    return spread


def _merge_measures(left: list, right: list) -> list:
    merged = [a + b for a, b in zip(left[:-2], right[:-2], strict=True)]
    firsts = [m for m in (left[-2], right[-2]) if m is not None]
    lasts = [m for m in (left[-1], right[-1]) if m is not None]
    return [*merged, min(firsts) if firsts else None, max(lasts) if lasts else None]


def _add(left: int, right: int) -> int:
    return left + right


# --- SQL: rows as a source, upserts ---------------------------------------------------


class _Source:
    """Rows of some of a model's columns as an SQL row source ``(…) AS c``: one array per
    column through ``unnest`` on PostgreSQL (a handful of parameters however many
    rows), ``VALUES`` elsewhere. Its columns are named ``prefix`` + the table's."""

    def __init__(self, model: type[models.Model], names: Sequence[str], prefix: str = "") -> None:
        self.fields = [model._meta.get_field(name) for name in names]
        self.columns = [f.column for f in self.fields]
        self.aliases = [prefix + column for column in self.columns]

    def sql(self, rows: Sequence[Sequence[Any]]) -> tuple[str, list]:
        if connection.vendor == "postgresql":
            arrays = ", ".join(f"%b::{f.db_type(connection)}[]" for f in self.fields)
            params = [list(column) for column in zip(*rows, strict=True)]
            aliases = ", ".join(self.aliases)
            # Interpolated: type and column names from the model's meta only.
            return f"(SELECT * FROM unnest({arrays}) AS c({aliases})) AS c", params  # noqa: S608
        row_sql = "(" + ", ".join(["%s"] * len(self.fields)) + ")"
        params = [
            model_field.get_db_prep_value(value, connection, prepared=False)
            for row in rows
            for model_field, value in zip(self.fields, row, strict=True)
        ]
        aliases = ", ".join(f"column{i + 1} AS {a}" for i, a in enumerate(self.aliases))
        values = ", ".join([row_sql] * len(rows))
        return f"(SELECT {aliases} FROM (VALUES {values})) AS c", params  # noqa: S608


@contextmanager
def _cursor() -> Iterator[Any]:
    """On PostgreSQL a psycopg cursor binding parameters server-side in binary (``%b``):
    arrays cost a fraction of the client CPU of Django's text-quoted ones (measured: a
    600-row batch spent 0.3 s quoting arrays as text)."""
    if connection.vendor == "postgresql":
        connection.ensure_connection()
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            yield cursor
    else:
        with connection.cursor() as cursor:
            yield cursor


#: SQLite allows 32,766 parameters a statement.
_SQLITE_MAX_PARAMETERS = 30_000


def _chunks(rows: list, width: int) -> Iterable[list]:
    if connection.vendor == "postgresql" or not rows:
        yield rows
        return
    size = max(1, _SQLITE_MAX_PARAMETERS // width)
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _run(source: _Source, rows: list, statement: Callable[[str], str]) -> list[tuple]:
    """Run ``statement(row source SQL)`` over the rows (in chunks on SQLite); what it
    returns."""
    returned: list[tuple] = []
    with _cursor() as cursor:
        for chunk in _chunks(rows, len(source.fields)):
            if not chunk:
                continue
            rows_sql, params = source.sql(chunk)
            cursor.execute(statement(rows_sql), params)
            if cursor.description is not None:
                returned += cursor.fetchall()
    return returned


def _pk_columns(model: type[models.Model]) -> list[str]:
    return [f.column for f in model._meta.pk_fields]


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


def _upsert_sums(
    model: type[models.Model], names: Sequence[str], sums: Sequence[str], rows: list
) -> None:
    """Insert rows, or add their ``sums`` columns (and min/max the request times) to the
    rows already there."""
    if not rows:
        return
    table = model._meta.db_table
    source = _Source(model, names)
    updates = _sum_updates(table, sums, with_times="first_request_at" in names)
    # Interpolated: column and table names from the models' meta only.
    _run(
        source,
        rows,
        lambda rows_sql: (
            f"INSERT INTO {table} ({', '.join(source.columns)}) "  # noqa: S608
            f"SELECT {', '.join(source.columns)} FROM {rows_sql} WHERE true "
            f"ON CONFLICT ({', '.join(_pk_columns(model))}) DO UPDATE SET {', '.join(updates)}"
        ),
    )


# --- first-seen tables ------------------------------------------------------------------


@dataclass(frozen=True)
class _FirstSeenTable:
    """A first-seen table, and which ``new_*`` measure its new rows count for."""

    model: type[models.Model]
    key: tuple[str, ...]
    #: Columns written besides the key: the checkpoint credited and the subject kind.
    credited: str
    measure: int
    #: Whether the credited checkpoint moves with first_seen_at (per slot: a late earlier
    #: record may have been served by another checkpoint of the slot).
    credit_moves: bool = False


_SLOT_SUBJECTS = _FirstSeenTable(
    SlotSubject, ("variant_id", "subject_hash"), "variant_version_id", _NEW_SLOT_SUBJECTS, True
)
_CHECKPOINT_SUBJECTS = _FirstSeenTable(
    CheckpointSubject, ("variant_version_id", "subject_hash"), "variant_version_id", _NEW_SUBJECTS
)
_CHECKPOINT_MESSAGES = _FirstSeenTable(
    CheckpointMessage,
    ("month", "variant_version_id", "message_hash"),
    "variant_version_id",
    _NEW_MESSAGES,
)


def _first_seen(
    table: _FirstSeenTable, candidates: dict[tuple, tuple[datetime, uuid.UUID, str]]
) -> list[tuple[int, uuid.UUID, str, datetime, int]]:
    """Insert-if-absent the candidates (key -> earliest (time, credited checkpoint,
    kind) in the batch); move back in time the rows an earlier record reaches late.

    Returns the count changes (measure, checkpoint, kind, time, +1/-1).
    """
    if not candidates:
        return []
    model, db_table = table.model, table.model._meta.db_table
    key_columns = [model._meta.get_field(name).column for name in table.key]
    names = [*table.key, "first_seen_at", "allocation_subject"]
    if table.credited not in names:
        names.append(table.credited)
    ordered = sorted(candidates.items(), key=lambda item: tuple(str(k) for k in item[0]))

    def row(key: tuple, seen: tuple) -> list:
        at, credited, kind = seen
        values = dict(zip(table.key, key, strict=True))
        values.update(first_seen_at=at, allocation_subject=kind, **{table.credited: credited})
        return [values[name] for name in names]

    rows = [row(key, seen) for key, seen in ordered]
    source = _Source(model, names)
    columns = ", ".join(source.columns)
    # Key order, so that two writers inserting the same new keys cannot deadlock.
    inserted = {
        _normalised_key(table, found)
        for found in _run(
            source,
            rows,
            lambda rows_sql: (
                f"INSERT INTO {db_table} ({columns}) "  # noqa: S608
                f"SELECT {columns} FROM {rows_sql} WHERE true ORDER BY {', '.join(key_columns)} "
                f"ON CONFLICT DO NOTHING RETURNING {', '.join(key_columns)}"
            ),
        )
    }
    changes = [
        (table.measure, credited, kind, at, 1)
        for key, (at, credited, kind) in ordered
        if _normalised_key(table, key) in inserted
    ]
    # Rows already there: move back the ones this batch saw earlier. The condition is
    # checked on each row before it is locked, so the usual case locks nothing.
    present = [
        values
        for (key, _), values in zip(ordered, rows, strict=True)
        if _normalised_key(table, key) not in inserted
    ]
    moves = [
        f"previous_first_seen_at = {db_table}.first_seen_at",
        "first_seen_at = c.new_first_seen_at",
        f"previous_allocation_subject = {db_table}.allocation_subject",
        "allocation_subject = c.new_allocation_subject",
    ]
    returning = ["previous_first_seen_at", "first_seen_at", "allocation_subject"]
    returning.append("previous_allocation_subject")
    returning.append(model._meta.get_field(table.credited).column)
    if table.credit_moves:
        moves += [
            f"previous_variant_version_id = {db_table}.variant_version_id",
            "variant_version_id = c.new_variant_version_id",
        ]
        returning.append("previous_variant_version_id")
    matches = " AND ".join(f"{db_table}.{c} = c.new_{c}" for c in key_columns)
    for moved in _run(
        _Source(model, names, prefix="new_"),
        present,
        lambda rows_sql: (
            f"UPDATE {db_table} SET {', '.join(moves)} FROM {rows_sql} "  # noqa: S608
            f"WHERE {matches} AND c.new_first_seen_at < {db_table}.first_seen_at "
            f"RETURNING {', '.join(returning)}"
        ),
    ):
        previous_at, at, kind, previous_kind, credited = moved[:5]
        previous_credited = moved[5] if table.credit_moves else credited
        changes.append(
            (table.measure, _uuid(previous_credited), previous_kind, _moment(previous_at), -1)
        )
        changes.append((table.measure, _uuid(credited), kind, _moment(at), 1))
    return changes


def _normalised_key(table: _FirstSeenTable, key: Sequence[Any]) -> tuple:
    """A key as the writer built it or as the database returned it, comparable."""
    normal = []
    for name, value in zip(table.key, key, strict=True):
        if name == "month":
            normal.append(value if isinstance(value, date) else date.fromisoformat(str(value)))
        else:
            normal.append(_uuid(value))
    return tuple(normal)


_slot_of_version: dict[uuid.UUID, uuid.UUID] = {}


def _slots_of(versions: set[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """Slot of each checkpoint. Kept for the process: a checkpoint never changes slot."""
    missing = versions - _slot_of_version.keys()
    if missing:
        _slot_of_version.update(
            VariantVersion.objects.filter(pk__in=missing).values_list("pk", "variant_id")
        )
    return _slot_of_version


def _candidates(rows: Sequence[Mapping[str, Any]]) -> list[tuple[_FirstSeenTable, dict]]:
    slots = _slots_of({_uuid(row["variant_version_id"]) for row in rows})
    per_table: list[tuple[_FirstSeenTable, dict]] = [
        (_SLOT_SUBJECTS, {}),
        (_CHECKPOINT_SUBJECTS, {}),
        (_CHECKPOINT_MESSAGES, {}),
    ]
    slot_subjects, checkpoint_subjects, messages = (found for _, found in per_table)

    def keep(found: dict, key: tuple, at: datetime, version: uuid.UUID, kind: str) -> None:
        seen = found.get(key)
        if seen is None or at < seen[0]:
            found[key] = (at, version, kind)

    for row in rows:
        version = _uuid(row["variant_version_id"])
        at, kind = row["created_at"], row["allocation_subject"]
        subject = row["allocation_subject_hash"]
        if subject is not None:
            subject = _uuid(subject)
            keep(slot_subjects, (slots[version], subject), at, version, kind)
            keep(checkpoint_subjects, (version, subject), at, version, kind)
        if row["client_request_id"] is not None:
            key = (month_of(at), version, message_hash(row["client_request_id"]))
            keep(messages, key, at, version, kind)
    return per_table


# --- the writer's entry point ------------------------------------------------------------

_COUNT_NAMES = (
    "variant_version_id",
    "allocation_subject",
    "resolution",
    "bucket",
    "writer",
    *MEASURES,
    "first_request_at",
    "last_request_at",
)
_ERROR_NAMES = (
    "variant_version_id",
    "allocation_subject",
    "resolution",
    "bucket",
    "error_kind",
    "writer",
    "count",
)
_BIN_NAMES = (
    "variant_version_id",
    "allocation_subject",
    "resolution",
    "bucket",
    "metric",
    "key",
    "writer",
    "count",
)


def record_requests(rows: Sequence[Mapping[str, Any]], *, writer: int | None = None) -> None:
    """Add attribution rows just inserted to the rollups, in the caller's transaction.

    ``rows`` map ``ExperimentRequest`` attnames to values (a dict per row, or a model
    instance's ``__dict__``); each row must be passed once, when it is first inserted.
    ``writer`` defaults to this process's ``WRITER``.
    """
    if not rows:
        return
    writer = WRITER if writer is None else writer
    with transaction.atomic(savepoint=False):
        aggregate = _Aggregate()
        for row in rows:
            aggregate.add_request(row)
        for table, candidates in _candidates(rows):
            for measure, version, kind, at, delta in _first_seen(table, candidates):
                aggregate.add_first_seen(measure, version, kind, at, delta)
        counts = _spread(aggregate.counts, _merge_measures)
        _upsert_sums(
            RequestRollup,
            _COUNT_NAMES,
            MEASURES,
            [[*key, writer, *values] for key, values in counts.items()],
        )
        errors = _spread(aggregate.errors, _add)
        _upsert_sums(
            ErrorKindRollup,
            _ERROR_NAMES,
            ("count",),
            [[*key, writer, count] for key, count in errors.items()],
        )
        bins = _spread(aggregate.bins, _add)
        _upsert_sums(
            LatencyBin,
            _BIN_NAMES,
            ("count",),
            [[*key, writer, count] for key, count in bins.items()],
        )


# --- rebuild and compaction ------------------------------------------------------------------

ROLLUP_MODELS = (RequestRollup, ErrorKindRollup, LatencyBin)
FIRST_SEEN_MODELS = (SlotSubject, CheckpointSubject, CheckpointMessage)
#: Columns ``record_requests`` reads from an attribution row.
SOURCE_COLUMNS = (
    "usage_id",
    "variant_version_id",
    "created_at",
    "allocation_subject",
    "allocation_subject_hash",
    "client_request_id",
    *USAGE_MEASURES,
)
REBUILD_CHUNK = 20_000

ProgressCallback = Callable[[int, int], None]


def rebuild(*, progress: ProgressCallback | None = None, chunk: int = REBUILD_CHUNK) -> int:
    """Every rollup and first-seen row again from the attribution rows; returns how many
    rows were read.

    One transaction that locks the writers out of the rollup tables until it commits
    (their records wait in the spool), so a row committed meanwhile is counted either
    here or by its writer afterwards, never both; reports read the old rollups
    meanwhile. Rows are
    replayed in time order through ``record_requests``, the writers' own code, as writer 0.
    """
    report = progress or (lambda done, total: None)
    with transaction.atomic():
        tables = [m._meta.db_table for m in (*ROLLUP_MODELS, *FIRST_SEEN_MODELS)]
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                # Holds off the writers (and waits for their open transactions); readers
                # keep reading the old rollups until this commits.
                cursor.execute(f"LOCK TABLE {', '.join(tables)} IN SHARE ROW EXCLUSIVE MODE")
            for table in tables:
                cursor.execute(f"DELETE FROM {table}")  # noqa: S608
        total = ExperimentRequest.objects.count()
        report(0, total)
        done = 0
        batch: list[dict[str, Any]] = []
        ordered = ExperimentRequest.objects.order_by("created_at", "usage_id").values(
            *SOURCE_COLUMNS
        )
        for row in ordered.iterator(chunk_size=chunk):
            batch.append(row)
            if len(batch) >= chunk:
                record_requests(batch, writer=COMPACTED_WRITER)
                done += len(batch)
                batch = []
                report(done, total)
        record_requests(batch, writer=COMPACTED_WRITER)
        done += len(batch)
        report(done, total)
    return done


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
            f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
            f"SELECT {', '.join(key)}, {COMPACTED_WRITER}, {', '.join(totals)} "
            f"FROM {{source}} WHERE true GROUP BY {', '.join(key)} "
            f"ON CONFLICT ({', '.join(_pk_columns(model))}) "
            f"DO UPDATE SET {', '.join(_sum_updates(table, sums, with_times=with_times))}"
        )
        while True:
            with transaction.atomic(), connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    cursor.execute(
                        f"WITH moved AS (DELETE FROM {table} WHERE ctid IN ("  # noqa: S608
                        f"SELECT ctid FROM {table} WHERE writer <> {COMPACTED_WRITER} "
                        f"LIMIT {COMPACT_BATCH} FOR UPDATE SKIP LOCKED) RETURNING *), "
                        f"folded AS ({upsert.format(source='moved')} RETURNING 1) "
                        "SELECT count(*) FROM moved"
                    )
                    moved = cursor.fetchone()[0]
                else:
                    # One writer at a time on SQLite: the copy and the delete cannot interleave.
                    source = f"(SELECT * FROM {table} WHERE writer <> {COMPACTED_WRITER})"  # noqa: S608
                    cursor.execute(upsert.format(source=source))
                    cursor.execute(f"DELETE FROM {table} WHERE writer <> {COMPACTED_WRITER}")  # noqa: S608
                    moved = cursor.rowcount
            folded += moved
            if connection.vendor != "postgresql" or moved < COMPACT_BATCH:
                break
    return folded
