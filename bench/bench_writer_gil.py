"""How long the event loop waits while the usage writer thread prepares and inserts a batch.

Run from the repository root:  python bench/bench_writer_gil.py  [--records 70] [--batches 150]

In one process, as in a gateway worker: an event loop waking every 0.5 ms (a busy loop at
concurrency 1) and the usage writer's own code on a thread, writing batches of attributed
records to the bench database (prompt capture, rows, both inserts). Batches take turns
between four ways: records prepared in one go or in ``gateway.usage.PREPARE_CHUNK`` chunks
with a pause between two, under a GIL switch interval (``sys.setswitchinterval``) of 5 ms
(Python's default) or 1 ms; so load from elsewhere on the machine hits all alike. Prints,
per way, the writer's CPU per batch and the loop's worst stall during each batch, while
preparing and while inserting (median, p90, max over batches), and the loop's stalls
outside batches: the machine's own noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid

from bench_environment import (
    configure_environment,
    create_database,
    machine_description,
    progress,
    seed_bench_experiment,
    setup_django,
)

TICK_SECONDS = 0.0005
#: Between two batches: the loop runs alone (the writer lingers in the gateway).
IDLE_SECONDS = 0.05
BODY = {"model": "bench-model-a", "messages": [{"role": "user", "content": "hello, bench"}]}


def queued_batch(records: int, version_id) -> list:
    from django.utils import timezone

    from gateway import usage

    def record() -> usage.UsageRecord:
        return usage.UsageRecord(
            created_at=timezone.now(),
            user_id=None,
            public_model_id="bench/preview",
            request_kind="chat_completions",
            is_stream=False,
            status_code=200,
            has_error=False,
            error_kind=None,
            input_tokens=10,
            output_tokens=20,
            ttfb_ms=1,
            total_ms=1,
            attribution=usage.Attribution(
                version_id=version_id,
                allocation_subject="machine",
                client_request_id=None,
                allocation_subject_hash=uuid.uuid4(),
                upstream_body=BODY,
            ),
        )

    return [usage._Queued(r.spool_entry(), BODY, None) for r in (record() for _ in range(records))]


#: The ways compared, batch after batch in turn: (name, prepare in chunks, switch interval).
WAYS = (
    ("in one go, 5 ms", False, 0.005),
    ("in chunks, 5 ms", True, 0.005),
    ("in one go, 1 ms", False, 0.001),
    ("in chunks, 1 ms", True, 0.001),
)


def write_batches(records: int, batches: int, version_id, spans: dict) -> None:
    """The writer's preparation and insert, each batch the next of ``WAYS``; each batch's
    (start, prepared, end, writer CPU) in ``spans[way]``."""
    import sys

    from django.db import connection

    from gateway import usage

    chunk, interval = usage.PREPARE_CHUNK, sys.getswitchinterval()
    try:
        for number in range(batches):
            way, in_chunks, switch_interval = WAYS[number % len(WAYS)]
            batch = queued_batch(records, version_id)
            time.sleep(IDLE_SECONDS)
            usage.PREPARE_CHUNK = chunk if in_chunks else records
            sys.setswitchinterval(switch_interval)
            started, cpu = time.perf_counter(), time.thread_time()
            pending = usage.UsageWriter._prepare(batch)
            prepared = time.perf_counter()
            usage._insert(pending)
            spans[way].append((started, prepared, time.perf_counter(), time.thread_time() - cpu))
    finally:
        usage.PREPARE_CHUNK = chunk
        sys.setswitchinterval(interval)
        connection.close()


async def loop_while(thread: threading.Thread) -> list[tuple[float, float]]:
    """Tick until ``thread`` ends; each tick's (due, ran) times."""
    ticks = []
    while thread.is_alive():
        due = time.perf_counter() + TICK_SECONDS
        await asyncio.sleep(TICK_SECONDS)
        ticks.append((due, time.perf_counter()))
    return ticks


def stalls(ticks, start: float, end: float) -> list[float]:
    return [ran - due for due, ran in ticks if due < end and ran > start]


def worst_stalls(ticks, windows) -> str:
    """Median / p90 / max over ``windows`` of the loop's worst stall in each."""
    worst = sorted(max(stalls(ticks, start, end), default=0.0) for start, end in windows)
    return (
        f"{statistics.median(worst) * 1e3:.2f} / {worst[int(len(worst) * 0.9)] * 1e3:.2f} / "
        f"{worst[-1] * 1e3:.2f} ms"
    )


def report(records: int, spans: dict, ticks: list) -> str:
    from gateway.usage import PREPARE_CHUNK, PREPARE_PAUSE_SECONDS

    lines = [
        f"Event loop vs usage writer thread  ({machine_description()})",
        f"{records} attributed records per batch; chunks of {PREPARE_CHUNK} with "
        f"{PREPARE_PAUSE_SECONDS * 1e6:.0f} µs pauses; sys.setswitchinterval as given; loop "
        f"ticking every {TICK_SECONDS * 1e3:g} ms",
        "| writer prepares, switch interval | batches | writer CPU per batch (median) | "
        "loop's worst stall per batch: median / p90 / max | while preparing | while inserting |",
        "|---|---|---|---|---|---|",
    ]
    for way, batch_spans in spans.items():
        cpu = statistics.median(c for *_, c in batch_spans)
        lines.append(
            f"| {way} | {len(batch_spans)} | {cpu * 1e3:.2f} ms | "
            f"{worst_stalls(ticks, [(s, e) for s, _, e, _ in batch_spans])} | "
            f"{worst_stalls(ticks, [(s, p) for s, p, _, _ in batch_spans])} | "
            f"{worst_stalls(ticks, [(p, e) for _, p, e, _ in batch_spans])} |"
        )
    every = [(s, e) for batch_spans in spans.values() for s, _, e, _ in batch_spans]
    outside = sorted(
        ran - due for due, ran in ticks if not any(due < e and ran > s for s, e in every)
    )
    lines.append(
        f"Loop stalls outside batches (the machine's noise): p50 "
        f"{outside[len(outside) // 2] * 1e3:.2f} ms, p99 "
        f"{outside[int(len(outside) * 0.99)] * 1e3:.2f} ms, max {outside[-1] * 1e3:.2f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=70, help="Records per batch (70).")
    parser.add_argument("--batches", type=int, default=200, help="Batches in all (200).")
    options = parser.parse_args()
    configure_environment()
    progress("preparing the bench database")
    create_database()
    setup_django()
    experiment = seed_bench_experiment("http://127.0.0.1:9/v1")
    version_id = experiment.variants.first().versions.first().pk
    spans: dict[str, list] = {way: [] for way, _, _ in WAYS}
    writer = threading.Thread(
        target=write_batches, args=(options.records, options.batches, version_id, spans)
    )
    progress(f"{options.batches} batches of {options.records} records")
    writer.start()
    ticks = asyncio.run(loop_while(writer))
    writer.join()
    print()
    print(report(options.records, spans, ticks))


if __name__ == "__main__":
    main()
