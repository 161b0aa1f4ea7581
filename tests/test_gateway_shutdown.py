"""Graceful shutdown (ASGI lifespan) writes pending usage records before it completes."""

from __future__ import annotations

import asyncio

import pytest
from django.utils import timezone

from config.asgi import application
from experiments.models import RequestKind
from gateway import usage
from gateway.models import GatewayUsage


def record(index: int) -> usage.UsageRecord:
    return usage.UsageRecord(
        created_at=timezone.now(),
        user_id=None,
        public_model_id=f"kilo/shutdown-{index}",
        request_kind=RequestKind.CHAT_COMPLETIONS,
        is_stream=False,
        status_code=200,
        has_error=False,
        error_kind=None,
        input_tokens=1,
        output_tokens=1,
        ttfb_ms=1,
        total_ms=1,
    )


async def shut_down() -> list[dict]:
    """Drive the lifespan protocol through shutdown; return what the app sent."""
    incoming = asyncio.Queue()
    sent: list[dict] = []
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        incoming.put_nowait(message)

    async def send(message):
        sent.append(message)

    await application({"type": "lifespan"}, incoming.get, send)
    return sent


@pytest.fixture
def spool_dir(settings, tmp_path):
    settings.GATEWAY_SPOOL_DIR = tmp_path / "spool"
    return settings.GATEWAY_SPOOL_DIR


@pytest.mark.django_db(transaction=True)
def test_lifespan_shutdown_completes_only_after_pending_usage_rows_are_written(spool_dir):
    # Submitted just before the shutdown: the writer is still lingering to fill a batch.
    for index in range(3):
        usage.writer.submit(record(index))

    sent = asyncio.run(shut_down())

    assert sent[-1] == {"type": "lifespan.shutdown.complete"}
    assert usage.writer.pending() == 0
    assert GatewayUsage.objects.filter(public_model_id__startswith="kilo/shutdown-").count() == 3


@pytest.mark.django_db(transaction=True)
def test_graceful_shutdown_leaves_an_empty_spool_when_the_database_is_up(spool_dir):
    for index in range(3):
        usage.writer.submit(record(index))

    asyncio.run(shut_down())

    assert list(spool_dir.iterdir()) == []
