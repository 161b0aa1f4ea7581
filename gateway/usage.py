"""Usage and attribution writes (SPEC §9): off the request path, durable, each exactly once.

``writer.submit(record)`` runs on the event loop once a response is complete and before
its last byte leaves: it appends the record's JSON line to this process's spool segment
(``gateway.spool``; one ``os.write``, a few µs) and queues it for the writer thread. The
thread captures the prompt blob and inserts batches of ``gateway_usage`` and
``model_experiment_request`` rows (same ``created_at``), adds them to the rollups and joins
feedback that was waiting for them (``experiments.feedback.join_landed``), all in one
transaction; every ``FEEDBACK_SWEEP_SECONDS`` it also rejoins the last minutes' feedback.
For a request whose answer was sampled it also assembles and stores the answer
(``experiments.prompts.answers``).

Exactly once by identity: a record's usage id is assigned when it is created and every
insert is ``ON CONFLICT DO NOTHING``, so replaying a segment after a crash, or retrying a
batch whose commit went unacknowledged, never counts a request twice. ``write_rows``
returns the records that were newly inserted (``RETURNING``): the seam for anything that
must count each record once (rollups).

Two kinds of failure, two answers:
* the database cannot be asked (connection refused or lost, failover, missing table:
  any other database error) → the records stay in the spool; the writer retries with
  backoff and then replays the spooled segments;
* the database refuses these values (data exception, integrity violation, program limit;
  or a value the driver cannot encode, such as a lone surrogate) → the batch is retried
  row by row; a refused record is sanitised and inserted, its original kept in the
  quarantine file; if the database still refuses it, it is set aside there. Never dropped,
  and never takes its batch with it.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from django.conf import settings
from django.db import DataError, Error, IntegrityError, connection, transaction

from experiments.feedback import join_landed, rejoin_recent
from experiments.models import PROMPT_HASH_FAILED, USAGE_MEASURES, ExperimentRequest
from experiments.prompts.answers import CapturedAnswer, capture_answer
from experiments.prompts.store import capture_prompt
from experiments.quality import FINISH_REASONS, error_category
from experiments.reports.rollups import record_requests
from gateway.models import GatewayUsage
from gateway.spool import Segment, Spool, json_line, read_segment

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
#: How long the writer keeps collecting after the first record of a batch. One transaction
#: per record costs ~5x the CPU per row of a batch of dozens (bench/RESULTS.md); rows land
#: at most this much later, which no client waits for.
BATCH_LINGER_SECONDS = 0.1
#: How often an idle writer wakes for its housekeeping (budget, adoption, retries).
HOUSEKEEPING_SECONDS = 0.25
#: Recount the spool folder's bytes (shared with other processes on the host) this often.
SPOOL_SCAN_SECONDS = 1.0
#: Look for segments of dead processes this often.
ADOPT_SECONDS = 2.0
#: Rejoin recent feedback this often (experiments.feedback.rejoin_recent): closes the race
#: of feedback committed at the same moment as its attribution row.
FEEDBACK_SWEEP_SECONDS = 2.0
#: Start a new segment past this size (or a quarter of the spool's budget, if smaller):
#: bounds what one replay reads and re-inserts, and lets written records leave the budget.
SEGMENT_ROTATE_BYTES = 1024 * 1024
#: Backoff between attempts while the database cannot be asked.
RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 2.0
#: Records prepared (prompt captured, rows built) between two pauses of the writer thread.
#: Capturing a prompt makes system calls, at each of which this thread lets go of the GIL
#: and takes it straight back; the event loop, waiting for the GIL, loses those races and
#: waited for the whole preparation of a batch (~25 µs a record: 2.5 ms for 100 records,
#: 12 ms for 500). A pause hands the GIL over: the loop waits for one chunk at most.
PREPARE_CHUNK = 16
PREPARE_PAUSE_SECONDS = 0.0002
#: SQLSTATE classes meaning "these values are refused": data exception, integrity
#: constraint violation, program limit exceeded (e.g. an index row too large).
REFUSED_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})
#: Client-chosen text is cut to this many characters when spooled or sanitised (it then
#: fits any btree index row).
CLIENT_TEXT_LIMIT = 512


@dataclass
class Attribution:
    version_id: str
    allocation_subject: str
    client_request_id: str | None
    #: The subject's pseudonym (Route.subject_hash); never the subject itself.
    allocation_subject_hash: uuid.UUID | None
    #: The transformed body sent upstream; hashed and stored by the writer.
    upstream_body: Any
    #: A sampled request's answer as relayed; assembled and stored by the writer.
    answer: CapturedAnswer | None = None


@dataclass
class UsageRecord:
    created_at: datetime
    user_id: int | None
    public_model_id: str
    request_kind: str
    is_stream: bool
    status_code: int
    has_error: bool
    error_kind: str | None
    input_tokens: int
    output_tokens: int
    ttfb_ms: int | None
    total_ms: int | None
    attribution: Attribution | None = None
    #: Why the answer ended (experiments.quality.FINISH_REASONS), None if not reported.
    finish_reason: str | None = None
    #: The usage row's primary key, fixed at creation: what makes a replay count once.
    id: uuid.UUID = field(default_factory=uuid.uuid4)

    def spool_entry(self) -> dict[str, Any]:
        """The record as its spool line holds it (the upstream body stays in memory)."""
        entry: dict[str, Any] = {
            "id": self.id.hex,
            "created_at": self.created_at.isoformat(),
            "user_id": self.user_id,
            # The client's choice, up to the body limit: cut before it is encoded on the
            # event loop and written to the spool (no model id is this long).
            "public_model_id": self.public_model_id[:CLIENT_TEXT_LIMIT],
            "request_kind": self.request_kind,
            "is_stream": self.is_stream,
            "status_code": self.status_code,
            "has_error": self.has_error,
            "error_kind": self.error_kind,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason,
            "ttfb_ms": self.ttfb_ms,
            "total_ms": self.total_ms,
        }
        attribution = self.attribution
        if attribution is not None:
            subject_hash = attribution.allocation_subject_hash
            entry["attribution"] = {
                "version_id": str(attribution.version_id),
                "allocation_subject": attribution.allocation_subject,
                "allocation_subject_hash": subject_hash.hex if subject_hash else None,
                "client_request_id": attribution.client_request_id,
            }
            if attribution.answer is not None:
                # Sampled: a replay without the writer's "answer_of" line knows the capture
                # was lost (``__failed__``) rather than never wanted (NULL).
                entry["attribution"]["answer"] = True
        return entry


# --- rows -------------------------------------------------------------------------

_MAX_SMALLINT = 32767
_MAX_INTEGER = 2147483647


@dataclass
class RecordRows:
    """One record's rows, as column values by attname, and its spool entry."""

    entry: dict[str, Any]
    usage: dict[str, Any]
    attribution: dict[str, Any] | None


def record_rows(
    entry: dict[str, Any], prompt: tuple[str, bool] | None, answer: str | None = None
) -> RecordRows:
    """The rows of a spool entry; ``prompt`` is (sha256 or ``__failed__``, was_truncated),
    ``answer`` the captured answer's sha256 (or ``__failed__``) of a sampled request."""
    usage = {
        "id": uuid.UUID(entry["id"]),
        "created_at": datetime.fromisoformat(entry["created_at"]),
        "user_id": entry["user_id"],
        "public_model_id": entry["public_model_id"],
        "request_kind": entry["request_kind"],
        "is_stream": entry["is_stream"],
        "status_code": min(max(entry["status_code"], 0), _MAX_SMALLINT),
        "has_error": entry["has_error"],
        "error_kind": entry["error_kind"],
        # Counts a partner reports: clamped here, or every batch would be refused.
        "input_tokens": min(max(entry["input_tokens"], 0), _MAX_INTEGER),
        "output_tokens": min(max(entry["output_tokens"], 0), _MAX_INTEGER),
        "ttfb_ms": entry["ttfb_ms"],
        "total_ms": entry["total_ms"],
        # Derived here, from the recorded status and kind: the request path pays nothing.
        "error_category": error_category(
            entry["status_code"], entry["has_error"], entry["error_kind"]
        ),
        # Absent from lines spooled before finish reasons were recorded.
        "finish_reason": _finish_reason(entry.get("finish_reason")),
    }
    attributed = entry.get("attribution")
    if attributed is None:
        return RecordRows(entry, usage, None)
    sha256, truncated = prompt or (PROMPT_HASH_FAILED, False)
    subject_hash = attributed["allocation_subject_hash"]
    attribution = {
        "usage_id": usage["id"],
        "variant_version_id": attributed["version_id"],
        "allocation_subject": attributed["allocation_subject"],
        "allocation_subject_hash": uuid.UUID(subject_hash) if subject_hash else None,
        "client_request_id": attributed["client_request_id"],
        "request_kind": usage["request_kind"],
        "request_body_sha256": sha256,
        "was_truncated": truncated,
        "response_sha256": (answer or PROMPT_HASH_FAILED) if attributed.get("answer") else None,
        "created_at": usage["created_at"],
        # Copies of the usage row's measures, inserted in the same transaction.
        **{name: usage[name] for name in USAGE_MEASURES},
    }
    return RecordRows(entry, usage, attribution)


def _finish_reason(value: Any) -> str | None:
    return value if value in FINISH_REASONS else None


class _Table:
    """A lean multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING pk`` for one table.

    Bypasses ``bulk_create``: model instances and per-field preparation cost the writer
    thread GIL time that the event loop then waits for.
    """

    def __init__(self, model) -> None:
        self.fields = list(model._meta.concrete_fields)
        self.names = [f.attname for f in self.fields]
        self.table = model._meta.db_table
        self.pk_column = model._meta.pk.column
        self._values_sql: dict[int, str] = {}
        self._arrays_sql: str | None = None

    def insert(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Insert the rows not already present; returns the primary keys inserted."""
        if connection.vendor == "postgresql":
            return self._insert_arrays(rows)
        return self._insert_values(rows)

    def _head(self) -> str:
        quote = connection.ops.quote_name
        columns = ", ".join(quote(f.column) for f in self.fields)
        # Names from the model's meta, values as parameters: nothing from a request.
        return f"INSERT INTO {quote(self.table)} ({columns})"

    def _tail(self) -> str:
        return f" ON CONFLICT DO NOTHING RETURNING {connection.ops.quote_name(self.pk_column)}"

    def _insert_arrays(self, rows: list[dict[str, Any]]) -> list[Any]:
        # One typed array per column, sent in binary on a server-binding cursor: about a
        # third of the client CPU of one text parameter per cell (measured: 20-40 µs
        # against 70-160 µs per record, both tables, batches of 100-500).
        if self._arrays_sql is None:
            arrays = ", ".join(f"%b::{f.db_type(connection)}[]" for f in self.fields)
            self._arrays_sql = f"{self._head()} SELECT * FROM unnest({arrays}){self._tail()}"  # noqa: S608
        columns = [[row[name] for row in rows] for name in self.names]
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(self._arrays_sql, columns)
            return [pk for (pk,) in cursor.fetchall()]

    def _insert_values(self, rows: list[dict[str, Any]]) -> list[Any]:
        count = len(rows)
        if count not in self._values_sql:
            row = "(" + ", ".join(["%s"] * len(self.fields)) + ")"
            values = ", ".join([row] * count)
            self._values_sql[count] = f"{self._head()} VALUES {values}{self._tail()}"
        params = [
            f.get_db_prep_save(row[f.attname], connection) for row in rows for f in self.fields
        ]
        with connection.cursor() as cursor:
            cursor.execute(self._values_sql[count], params)
            return [pk for (pk,) in cursor.fetchall()]


_usage_table = _Table(GatewayUsage)
_attribution_table = _Table(ExperimentRequest)


class DatabaseUnreachable(Exception):
    """The database could not be asked; the records stay in the spool."""


def _refused(exc: Exception) -> bool:
    """Whether the database (or its driver) refused these values, rather than being away."""
    if not isinstance(exc, Error):
        return True  # a value our side cannot send (a lone surrogate: UnicodeEncodeError)
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    sqlstate = getattr(exc.__cause__, "sqlstate", None) or ""
    return sqlstate[:2] in REFUSED_SQLSTATE_CLASSES


def _insert(batch: list[RecordRows]) -> list[RecordRows]:
    with transaction.atomic():
        inserted = {
            pk if isinstance(pk, uuid.UUID) else uuid.UUID(pk)
            for pk in _usage_table.insert([r.usage for r in batch])
        }
        # An attribution row lands in the same transaction as its usage row, so a usage
        # row already present means its attribution is too.
        attributions = [
            r.attribution for r in batch if r.attribution is not None and r.usage["id"] in inserted
        ]
        if attributions:
            _attribution_table.insert(attributions)
            # Same transaction, and only the rows that were new: a replayed record that
            # was already written is not counted again.
            record_requests(attributions)
            # Feedback that arrived before these rows joins them now (one statement, and
            # only when a row carries a client request id).
            join_landed(attributions)
    return [r for r in batch if r.usage["id"] in inserted]


def _insert_or_raise(batch: list[RecordRows]) -> list[RecordRows]:
    """``_insert``; DatabaseUnreachable when the database could not be asked."""
    try:
        return _insert(batch)
    except Exception as exc:
        if _refused(exc):
            raise
        raise DatabaseUnreachable(type(exc).__name__) from exc


def write_rows(batch: list[RecordRows], spool: Spool) -> list[RecordRows]:
    """Insert a batch by id; returns the records newly inserted (not already present).

    A refused batch is retried row by row; refused rows are sanitised or set aside in the
    spool's quarantine file. Raises DatabaseUnreachable, having written nothing it cannot
    write again, when the database cannot be asked.
    """
    try:
        return _insert_or_raise(batch)
    except DatabaseUnreachable:
        raise
    except Exception as exc:
        if len(batch) > 1:
            logger.warning("usage batch refused (%s); writing row by row", _reason(exc))
    inserted: list[RecordRows] = []
    for rows in batch:
        inserted += _write_alone(rows, spool)
    return inserted


def _write_alone(rows: RecordRows, spool: Spool) -> list[RecordRows]:
    try:
        return _insert_or_raise([rows])
    except DatabaseUnreachable:
        raise
    except Exception as exc:
        reason = _reason(exc)
        cleaned = sanitised(rows, forget_user=isinstance(exc, IntegrityError))
    try:
        inserted = _insert_or_raise([cleaned])
    except DatabaseUnreachable:
        raise
    except Exception as exc:
        spool.quarantine([_quarantine_entry(rows.entry, _reason(exc), "set_aside")])
        logger.error("usage record %s refused by the database; set aside", rows.entry["id"])
        return []
    # The original stays inspectable: nothing is altered unseen.
    spool.quarantine([_quarantine_entry(rows.entry, reason, "sanitised")])
    logger.warning("usage record %s refused (%s); sanitised", rows.entry["id"], reason)
    return inserted


def _reason(exc: Exception) -> str:
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    return f"{type(exc).__name__} {sqlstate}" if sqlstate else type(exc).__name__


def _quarantine_entry(entry: dict[str, Any], reason: str, action: str) -> dict[str, Any]:
    return {
        "quarantined_at": datetime.now(UTC).isoformat(),
        "action": action,
        "reason": reason,
        "record": entry,
    }


_SURROGATES = re.compile("[\ud800-\udfff]")


def _sanitised_row(model, row: dict[str, Any]) -> dict[str, Any]:
    clean = dict(row)
    for model_field in model._meta.concrete_fields:
        value = row[model_field.attname]
        if isinstance(value, str):
            value = _SURROGATES.sub("\ufffd", value.replace("\x00", "\ufffd"))
            clean[model_field.attname] = value[: model_field.max_length or CLIENT_TEXT_LIMIT]
        elif isinstance(value, int) and not isinstance(value, bool):
            low, high = connection.ops.integer_field_range(model_field.get_internal_type())
            low = 0 if low is None else low
            clean[model_field.attname] = min(max(value, low), high if high is not None else value)
    return clean


def sanitised(rows: RecordRows, *, forget_user: bool = False) -> RecordRows:
    """Rows the database accepts whatever a client or partner put in them: NUL and lone
    surrogates become U+FFFD, texts are cut to their column (or 512 characters), numbers
    clamped to their column; ``forget_user`` (after an integrity error) makes a user
    deleted meanwhile NULL, as its foreign key's ``SET_NULL`` would have."""
    usage = _sanitised_row(GatewayUsage, rows.usage)
    if forget_user:
        usage["user_id"] = None
    attribution = rows.attribution
    if attribution is not None:
        attribution = _sanitised_row(ExperimentRequest, attribution)
        attribution.update({name: usage[name] for name in USAGE_MEASURES})
    return RecordRows(rows.entry, usage, attribution)


# --- the writer -------------------------------------------------------------------

#: Queued by ``UsageWriter.stop`` after the records: the writer finishes and ends.
_STOP = object()


@dataclass
class _Queued:
    entry: dict[str, Any]
    #: The transformed upstream body (attributed records only), captured by the writer.
    upstream_body: Any
    #: A sampled answer (attributed records only), captured by the writer.
    answer: CapturedAnswer | None
    #: Where the record's line is; None if the spool could not be written.
    segment: Segment | None


class UsageWriter:
    def __init__(self) -> None:
        self._queue: queue.Queue[_Queued | object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._spool: Spool | None = None
        #: While the database cannot be asked: when to try again (monotonic).
        self._retry_at: float | None = None
        self._backoff = RETRY_MIN_SECONDS
        self._backlog = False
        self._stop_deadline = 0.0
        self._next_scan = self._next_adopt = self._next_feedback_sweep = 0.0

    @property
    def accepting(self) -> bool:
        """False while the spool is over its budget (or cannot be written): a request
        taken now might not be recorded, so the gateway refuses model requests."""
        spool = self._spool
        return spool is None or spool.has_room

    def start(self) -> None:
        """Open this process's spool segment and start the writer thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                spool = Spool(
                    settings.GATEWAY_SPOOL_DIR,
                    settings.GATEWAY_SPOOL_MAX_BYTES,
                    settings.GATEWAY_SPOOL_FSYNC_SECONDS,
                )
                spool.open()
                self._spool = spool
                self._retry_at, self._backoff, self._backlog = None, RETRY_MIN_SECONDS, False
                self._next_scan = self._next_adopt = self._next_feedback_sweep = 0.0
                self._thread = threading.Thread(
                    target=self._run, name="gateway-usage-writer", daemon=True
                )
                self._thread.start()

    def submit(self, record: UsageRecord) -> None:
        """Spool and queue a record; never raises into the request path."""
        try:
            self.start()
            entry = record.spool_entry()
            segment = self._spool.append(json_line(entry))
            attribution = record.attribution
            body = attribution.upstream_body if attribution else None
            answer = attribution.answer if attribution else None
            self._queue.put_nowait(_Queued(entry, body, answer, segment))
        except Exception:
            logger.exception("usage record could not be queued")

    def stop(self, timeout: float = 30.0) -> bool:
        """Write everything submitted (to the database, else to the spool for the next
        process), then close the spool and the connection and end the thread.

        The next ``submit`` starts again. False if the writer did not finish in time.
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        self._stop_deadline = time.monotonic() + timeout
        self._queue.put(_STOP)
        thread.join(timeout)
        return not thread.is_alive()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted record is in the database or the spool; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    # --- the thread ---

    def _run(self) -> None:
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._next_batch()
                try:
                    if batch:
                        self._write(batch)
                    self._housekeeping()
                except Exception:
                    logger.exception("usage writer step failed")
            self._finish()
        except Exception:
            logger.exception("usage writer stopped unexpectedly")
        finally:
            connection.close()

    def _next_batch(self) -> tuple[list[_Queued], bool]:
        busy = self._replayable() is not None and self._database_due()
        try:
            first = self._queue.get(block=not busy, timeout=HOUSEKEEPING_SECONDS)
        except queue.Empty:
            return [], False
        if first is _STOP:
            self._queue.task_done()
            return [], True
        batch = [first]
        if not (self._backlog or busy):
            # Sleeping (rather than waiting on the queue) wakes this thread once per
            # batch, not once per record.
            time.sleep(BATCH_LINGER_SECONDS)
        stopping = False
        while len(batch) < BATCH_SIZE:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.task_done()
                stopping = True
                break
            batch.append(item)
        self._backlog = len(batch) == BATCH_SIZE
        return batch, stopping

    def _write(self, batch: list[_Queued]) -> None:
        try:
            pending = self._prepare(batch)
            if self._database_due():
                try:
                    write_rows(pending, self._spool)
                except DatabaseUnreachable as exc:
                    self._database_lost(exc)
                except Exception:
                    # Not the records' fault (they were refused row by row): replay later.
                    logger.exception("usage batch not written; left in the spool")
                else:
                    self._database_back()
                    for item in batch:
                        if item.segment is not None:
                            item.segment.processed += 1
                    return
            self._spill(batch, pending)
        finally:
            for _ in batch:
                self._queue.task_done()

    @staticmethod
    def _prepare(batch: list[_Queued]) -> list[RecordRows]:
        """Each record's rows, its prompt captured: ``PREPARE_CHUNK`` records at a time,
        with a pause between two chunks."""
        pending: list[RecordRows] = []
        for start in range(0, len(batch), PREPARE_CHUNK):
            if start:
                time.sleep(PREPARE_PAUSE_SECONDS)
            pending += [
                record_rows(
                    item.entry,
                    capture_prompt(item.upstream_body) if "attribution" in item.entry else None,
                    capture_answer(item.answer) if item.answer is not None else None,
                )
                for item in batch[start : start + PREPARE_CHUNK]
            ]
        return pending

    def _spill(self, batch: list[_Queued], pending: list[RecordRows]) -> None:
        """Leave records for a replay from the spool, with the prompt hashes captured."""
        spool = self._spool
        for item, rows in zip(batch, pending, strict=True):
            segment = item.segment or spool.append(json_line(item.entry))
            if segment is None:
                logger.error("usage record %s lost: the spool cannot be written", item.entry["id"])
                continue
            attribution = rows.attribution
            if attribution is not None and attribution["request_body_sha256"] != PROMPT_HASH_FAILED:
                spool.append_to(
                    segment,
                    json_line(
                        {
                            "prompt_of": item.entry["id"],
                            "sha256": attribution["request_body_sha256"],
                            "truncated": attribution["was_truncated"],
                        }
                    ),
                )
            answer = attribution["response_sha256"] if attribution is not None else None
            if answer is not None and answer != PROMPT_HASH_FAILED:
                spool.append_to(
                    segment, json_line({"answer_of": item.entry["id"], "sha256": answer})
                )
            segment.needs_replay = True
            segment.processed += 1

    def _housekeeping(self) -> None:
        spool = self._spool
        now = time.monotonic()
        if now >= self._next_scan:
            spool.rescan()
            if spool.write_failed:
                spool.rotate()  # try a fresh segment: the disk may have room again
            self._next_scan = now + SPOOL_SCAN_SECONDS
        current = spool.current
        due = self._database_due()
        rotate_at = min(SEGMENT_ROTATE_BYTES, spool.max_bytes // 4)
        if current is not None and (current.size >= rotate_at or (current.needs_replay and due)):
            spool.rotate()
        for segment in list(spool.segments):
            if segment.settled and not segment.needs_replay:
                spool.delete(segment)
        if not due:
            return
        if now >= self._next_adopt:
            spool.adopt_orphans()
            self._next_adopt = now + ADOPT_SECONDS
        if now >= self._next_feedback_sweep:
            self._next_feedback_sweep = now + FEEDBACK_SWEEP_SECONDS
            self._sweep_feedback()
        self._replay_next()

    @staticmethod
    def _sweep_feedback() -> None:
        try:
            rejoin_recent()
        except Exception as exc:
            # The next sweep tries again; the records' own path is unaffected.
            logger.warning("feedback sweep failed (%s)", type(exc).__name__)

    def _replayable(self) -> Segment | None:
        spool = self._spool
        if spool is None:
            return None
        return next((s for s in spool.segments if s.needs_replay and s.settled), None)

    def _replay_next(self) -> None:
        """Insert every record of one settled segment from its file, then delete it."""
        segment = self._replayable()
        if segment is None:
            return
        contents = read_segment(segment.path)
        pending, malformed = [], []
        for entry in contents.records:
            try:
                record_id = entry.get("id")
                pending.append(
                    record_rows(
                        entry, contents.prompts.get(record_id), contents.answers.get(record_id)
                    )
                )
            except (KeyError, TypeError, ValueError):
                malformed.append(_quarantine_entry(entry, "malformed spool record", "set_aside"))
        try:
            for start in range(0, len(pending), BATCH_SIZE):
                write_rows(pending[start : start + BATCH_SIZE], self._spool)
        except DatabaseUnreachable as exc:
            self._database_lost(exc)
            return
        except Exception as exc:
            # Retried with backoff like an outage, never in a tight loop.
            logger.exception("usage spool segment not replayed")
            self._database_lost(DatabaseUnreachable(type(exc).__name__))
            return
        self._database_back()
        malformed += [
            _quarantine_entry({"line": line}, "unreadable spool line", "set_aside")
            for line in contents.unreadable
        ]
        if malformed:
            self._spool.quarantine(malformed)
        self._spool.delete(segment)
        logger.info("usage spool segment replayed: %d records", len(pending))

    def _finish(self) -> None:
        """Shutdown: no more appends; replay what the database takes before the deadline,
        delete what is written, and unlock the rest for the next process to adopt."""
        spool = self._spool
        spool.retire_current()
        self._retry_at = None  # one last attempt, whatever the backoff
        while time.monotonic() < self._stop_deadline and self._database_due():
            for segment in list(spool.segments):
                if segment.settled and not segment.needs_replay:
                    spool.delete(segment)
            if self._replayable() is None:
                break
            self._replay_next()
        left = sum(segment.appended for segment in spool.segments if segment.needs_replay)
        if left:
            logger.warning("usage spool: records left in %s for the next process", spool.directory)
        spool.release_all()

    def _database_due(self) -> bool:
        return self._retry_at is None or time.monotonic() >= self._retry_at

    def _database_lost(self, exc: DatabaseUnreachable) -> None:
        if self._retry_at is None:
            logger.warning(
                "usage database unreachable (%s); records wait in the spool at %s",
                exc,
                self._spool.directory,
            )
        else:
            self._backoff = min(self._backoff * 2, RETRY_MAX_SECONDS)
        self._retry_at = time.monotonic() + self._backoff
        try:
            connection.close()
        except Exception as close_exc:
            logger.debug("closing the lost connection failed (%s)", type(close_exc).__name__)

    def _database_back(self) -> None:
        if self._retry_at is not None:
            logger.info("usage database reachable again; replaying the spool")
        self._retry_at = None
        self._backoff = RETRY_MIN_SECONDS


writer = UsageWriter()
