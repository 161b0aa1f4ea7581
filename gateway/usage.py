"""Usage and attribution writes (SPEC §9), off the request path.

The view hands a ``UsageRecord`` to ``writer.submit`` after the response is
complete; a background thread batches records into ``gateway_usage`` and
``model_experiment_request`` rows (same ``created_at``), capturing the prompt
blob first. Failures are logged and never reach a client. ``writer.flush()``
waits for everything submitted so far; the ASGI lifespan calls it on shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import close_old_connections, connection, transaction

from experiments.models import USAGE_MEASURES, ExperimentRequest
from experiments.reports.rollups import record_requests
from gateway.models import GatewayUsage
from gateway.prompt_store import capture_prompt

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
#: How long the writer keeps collecting after the first record of a batch. One transaction
#: per record costs ~5x the CPU per row of a batch of dozens (bench/RESULTS.md); rows land
#: at most this much later, which no client waits for.
BATCH_LINGER_SECONDS = 0.1


@dataclass
class Attribution:
    version_id: str
    allocation_subject: str
    client_request_id: str | None
    #: The subject's pseudonym (Route.subject_hash); never the subject itself.
    allocation_subject_hash: uuid.UUID | None
    #: The transformed body sent upstream; hashed and stored by the writer.
    upstream_body: Any


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


_MAX_SMALLINT = 32767


def _rows(record: UsageRecord) -> tuple[GatewayUsage, ExperimentRequest | None]:
    usage = GatewayUsage(
        id=uuid.uuid4(),
        created_at=record.created_at,
        user_id=record.user_id,
        public_model_id=record.public_model_id,
        request_kind=record.request_kind,
        is_stream=record.is_stream,
        status_code=min(max(record.status_code, 0), _MAX_SMALLINT),
        has_error=record.has_error,
        error_kind=record.error_kind,
        input_tokens=max(record.input_tokens, 0),
        output_tokens=max(record.output_tokens, 0),
        ttfb_ms=record.ttfb_ms,
        total_ms=record.total_ms,
    )
    attribution = record.attribution
    if attribution is None:
        return usage, None
    sha256, truncated = capture_prompt(attribution.upstream_body)
    request = ExperimentRequest(
        usage_id=usage.id,
        variant_version_id=attribution.version_id,
        allocation_subject=attribution.allocation_subject,
        allocation_subject_hash=attribution.allocation_subject_hash,
        client_request_id=attribution.client_request_id,
        request_kind=record.request_kind,
        request_body_sha256=sha256,
        was_truncated=truncated,
        created_at=record.created_at,
        # Copies of the usage row's measures, inserted in the same transaction.
        **{name: getattr(usage, name) for name in USAGE_MEASURES},
    )
    return usage, request


def write_records(records: list[UsageRecord]) -> None:
    """Insert records in one transaction; if that fails, one by one so one bad row loses one."""
    pairs = [_rows(record) for record in records]
    try:
        _insert(pairs)
        return
    except Exception as exc:
        logger.warning("usage batch insert failed (%s); retrying row by row", type(exc).__name__)
        close_old_connections()
    for pair in pairs:
        try:
            _insert([pair])
        except Exception as exc:
            logger.error(
                "usage row dropped for %s (%s)", pair[0].public_model_id, type(exc).__name__
            )


def _insert(pairs: list[tuple[GatewayUsage, ExperimentRequest | None]]) -> None:
    with transaction.atomic():
        GatewayUsage.objects.bulk_create([usage for usage, _ in pairs])
        requests = [request for _, request in pairs if request is not None]
        if requests:
            ExperimentRequest.objects.bulk_create(requests)
            # Same transaction: the rollups count exactly the rows that landed.
            record_requests([vars(request) for request in requests])


#: Queued by ``UsageWriter.stop`` after the records: the writer closes its connection and ends.
_STOP = object()


class UsageWriter:
    def __init__(self) -> None:
        self._queue: queue.Queue[UsageRecord | object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, record: UsageRecord) -> None:
        """Queue a record; never blocks and never raises into the request path."""
        try:
            self._ensure_started()
            self._queue.put_nowait(record)
        except Exception:
            logger.exception("usage record could not be queued")

    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="gateway-usage-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        backlog = False
        while True:
            first = self._queue.get()
            if first is _STOP:
                connection.close()
                self._queue.task_done()
                return
            batch = [first]
            if not backlog:
                # Sleeping (rather than waiting on the queue) wakes this thread once per
                # batch, not once per record.
                time.sleep(BATCH_LINGER_SECONDS)
            while len(batch) < BATCH_SIZE:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    # Handled on the next turn of the loop, after this batch.
                    self._queue.task_done()
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            backlog = len(batch) == BATCH_SIZE
            try:
                close_old_connections()
                write_records(batch)
            except Exception:
                logger.exception("usage batch lost")
            finally:
                for _ in batch:
                    self._queue.task_done()

    def stop(self, timeout: float = 30.0) -> bool:
        """Write everything submitted, then close the writer's connection and end its thread.

        The next ``submit`` starts a new thread. False if the writer did not finish in time.
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        self._queue.put(_STOP)
        thread.join(max(deadline - time.monotonic(), 0))
        return not thread.is_alive()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted record is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True


writer = UsageWriter()
