"""What recording the quality signals costs the gateway, per event and per request.

Run from the repository root:  python bench/bench_quality_signals.py

The finish reason is read from values the relay parses anyway (for usage), so its cost is
a few dictionary lookups per event; the error category is derived by the writer thread as
it builds the rows. Measured in-process (no server, no database): the blinding of one
event with and without the finish reason tracker, for the demo upstream's events of each
API, and building one record's rows with and without the two new columns. Whole-gateway
CPU per request: bench/bench_gateway.py.
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("SECRET_KEY", "bench-quality-signals")

import django  # noqa: E402

django.setup()

from datetime import UTC, datetime  # noqa: E402

from experiments.models import RequestKind  # noqa: E402
from gateway.blinding import Blinder, FinishReason, KeyScrubber, checkpoint_identifiers  # noqa: E402
from gateway.demo.upstream import ROUTES, EchoReply  # noqa: E402
from gateway.usage import UsageRecord, record_rows  # noqa: E402

KINDS = {
    "/chat/completions": RequestKind.CHAT_COMPLETIONS,
    "/responses": RequestKind.RESPONSES,
    "/messages": RequestKind.MESSAGES,
}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "input": "hello"}


def per_event_us(route: str, *, finish: str) -> tuple[float, float, int]:
    """Mean µs per event of a 20-delta stream: blinding one parsed event without the
    finish tracker, and the tracker's own ``absorb`` on it."""
    reply = EchoReply(route, {**BODY, "demo_finish": finish}, 20)
    # Parsed once: rewriting is idempotent (the model id is set to the same public id).
    values = [p for _, p in ROUTES[route][1](reply) if not isinstance(p, str)]
    identifiers = checkpoint_identifiers((("http://10.0.0.5:8000/v1", "rc"),))
    blinder = Blinder("pub", KeyScrubber("sk-key"), identifiers)
    tracker = FinishReason.for_kind(KINDS[route])

    def blind() -> None:
        for value in values:
            blinder.rewrite(value)

    def track() -> None:
        for value in values:
            tracker.absorb(value)

    number = 2000
    blinding = min(timeit.repeat(blind, number=number, repeat=7)) / number / len(values)
    tracking = min(timeit.repeat(track, number=number, repeat=7)) / number / len(values)
    assert tracker.normalised == finish
    return blinding * 1e6, tracking * 1e6, len(values)


def record_rows_us() -> float:
    record = UsageRecord(
        created_at=datetime.now(UTC),
        user_id=None,
        public_model_id="pub",
        request_kind="chat_completions",
        is_stream=True,
        status_code=429,
        has_error=True,
        error_kind="upstream_http_429",
        input_tokens=10,
        output_tokens=20,
        ttfb_ms=100,
        total_ms=900,
        finish_reason="stop",
    )
    entry = record.spool_entry()
    number = 20000
    return min(timeit.repeat(lambda: record_rows(entry, None), number=number, repeat=5)) / number


def main() -> None:
    print("Per stream event (parsed once): blinding it, and the finish tracker's absorb")
    for route in ROUTES:
        for finish in ("stop", "tool_calls"):
            blinding, tracking, events = per_event_us(route, finish=finish)
            print(
                f"  {route:<18} {finish:<11} {events:>2} events: blinding {blinding:.2f} µs, "
                f"finish tracker +{tracking:.2f} µs/event = +{tracking * events:.1f} µs/stream"
            )
    rows = record_rows_us() * 1e6
    print(f"Writer thread: rows of one record, error category included: {rows:.2f} µs")


if __name__ == "__main__":
    main()
