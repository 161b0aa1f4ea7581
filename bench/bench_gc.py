"""What stalls the gateway's event loop: cyclic garbage, collections, loop lag.

Run from the repository root:  python bench/bench_gc.py  [--requests N]

Starts the demo upstream and the gateway (uvicorn, one worker, PostgreSQL + Redis) as real
servers, the gateway wrapped by ``bench/gc_probe.py``, then:

1. Garbage (counts, deterministic): after a warm-up, ``gc.DEBUG_SAVEALL`` keeps every object
   the collector finds unreachable during N requests at concurrency 1 (usage rows written);
   prints the cyclic garbage per request grouped by type and the growth of tracked objects.
   Garbage that only a collection can free is what makes collections frequent, and each
   full collection walks the whole heap with the event loop stopped.
2. Timing (indicative on a shared machine): N requests at concurrency 1 and at 32, with
   collections per generation and their durations (``gc.callbacks``), the event-loop lag
   (a ticker's lateness), client latency percentiles against the upstream direct, and the
   gateway's CPU per request (usage and attribution writes included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import urllib.request

from bench_environment import (
    configure_environment,
    create_database,
    machine_description,
    progress,
    setup_django,
)
from bench_gateway import (
    Bench,
    cpu_seconds,
    serve_and_measure,
    usage_rows,
    wait_for_usage_rows,
)

PROBE_APP = "gc_probe:application"
WARM_UP = 300
#: Streams in the streaming garbage count: fewer requests, each relaying many events.
STREAM_SHARE = 10
STREAM = {"stream": True, "demo_chunks": 20, "demo_chunk_delay_ms": 0}
#: Garbage types listed (the rest summed as "other").
TOP_TYPES = 40


def probe(port: int, name: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/__probe/{name}", method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback
        return json.load(response)


class GcBench(Bench):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows = usage_rows()

    async def gateway_load(self, total: int, concurrency: int, extra: dict | None = None):
        results, wall = await self.load("gateway", total, concurrency, extra)
        self.rows += total
        return results, wall

    async def garbage(self, total: int, extra: dict | None = None) -> dict:
        what = "streams" if extra else "requests"
        progress(f"garbage: warm-up, {WARM_UP} {what}")
        await self.gateway_load(WARM_UP, 1, extra)
        wait_for_usage_rows(self.rows)
        probe(self.gateway_port, "garbage/start")
        progress(f"garbage: {total} {what} at concurrency 1, every unreachable object kept")
        await self.gateway_load(total, 1, extra)
        wait_for_usage_rows(self.rows)
        found = probe(self.gateway_port, "garbage/stop")
        found["requests"] = total
        found["what"] = what
        return found

    async def timing(self, total: int, concurrency: int) -> dict:
        progress(f"timing: direct, {total} requests at concurrency {concurrency}")
        direct, _ = await self.load("direct", total, concurrency)
        progress(f"timing: gateway, {total} requests at concurrency {concurrency}")
        cpu_before = cpu_seconds(self.gateway_pid)
        probe(self.gateway_port, "timing/start")
        results, wall = await self.gateway_load(total, concurrency)
        measured = probe(self.gateway_port, "timing/stop")
        wait_for_usage_rows(self.rows)
        measured["cpu_ms"] = (cpu_seconds(self.gateway_pid) - cpu_before) / total * 1000
        measured["requests"] = total
        measured["concurrency"] = concurrency
        measured["rps"] = total / wall
        measured["latency"] = {
            target: percentiles([r.latency for r in batch])
            for target, batch in (("direct", direct), ("gateway", results))
        }
        return measured


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max": ordered[-1] * 1000,
    }


def garbage_report(found: dict) -> list[str]:
    count, what = found["requests"], found["what"]
    lines = [
        f"Cyclic garbage ({count} {what} at concurrency 1 after a warm-up of {WARM_UP}; "
        "counts are deterministic up to the probe's own request and timers)",
        f"- unreachable objects found by the collector: {found['unreachable']} "
        f"= {found['unreachable'] / count:.2f} per {what[:-1]}",
        f"- tracked objects: {found['tracked_before']} -> {found['tracked_after']} "
        f"({(found['tracked_after'] - found['tracked_before']) / count:+.2f} per {what[:-1]})",
        "",
        f"| type | objects | per {what[:-1]} |",
        "|---|---|---|",
    ]
    by_type = found["by_type"]
    for name, number in by_type[:TOP_TYPES]:
        lines.append(f"| {name} | {number} | {number / count:.2f} |")
    rest = sum(number for _, number in by_type[TOP_TYPES:])
    if rest:
        lines.append(f"| other ({len(by_type) - TOP_TYPES} types) | {rest} | {rest / count:.2f} |")
    return lines


def lag_cells(lag: dict) -> str:
    if not lag.get("n"):
        return "| 0 | | | |"
    return (
        f"| {lag['n']} | {lag['p50_ms']:.2f} / {lag['p99_ms']:.2f} / {lag['max_ms']:.2f} ms | "
        f"{lag['over_2ms']} | {lag['over_5ms']} |"
    )


def timing_report(runs: list[dict]) -> list[str]:
    setting = runs[-1]["settings"]
    lines = [
        "Timing (indicative: the machine is shared). Gateway: sys.getswitchinterval() "
        f"{setting['switch_interval_ms']:g} ms, gc thresholds {setting['gc_threshold']}, "
        f"{setting['gc_frozen']} objects frozen (gc.freeze), {setting['gc_tracked']} tracked",
        "| concurrency | requests | gateway req/s | CPU/req | latency p50 direct/gateway | "
        "latency p99 direct/gateway | added p99 | loop thread waiting for a CPU (OS) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        latency = run["latency"]
        lines.append(
            f"| {run['concurrency']} | {run['requests']} | {run['rps']:.0f} | "
            f"{run['cpu_ms']:.2f} ms | {latency['direct']['p50']:.2f} / "
            f"{latency['gateway']['p50']:.2f} ms | {latency['direct']['p99']:.2f} / "
            f"{latency['gateway']['p99']:.2f} ms | "
            f"{latency['gateway']['p99'] - latency['direct']['p99']:+.2f} ms | "
            f"{run['loop_runqueue_wait_ms'] / run['requests'] * 1000:.0f} µs per request |"
        )
    lines += [
        "",
        "Event-loop lag: a ticker's lateness (every 5 ms); late ticks (> 1 ms) by what "
        "overlapped the wait, first match in this order",
        "| concurrency | ticks | count | p50 / p99 / max | > 2 ms | > 5 ms |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(f"| {run['concurrency']} | all {lag_cells(run['loop_lag'])}")
        for cause in ("full collection", "young collection", "writer batch", "none of these"):
            if cause in run["lag_by_cause"]:
                cells = lag_cells(run["lag_by_cause"][cause])
                lines.append(f"| {run['concurrency']} | late, {cause} {cells}")
    lines += [
        "",
        "Usage writer thread during the timing runs (its CPU time per batch: while it runs, "
        "the event loop competes with it for the GIL)",
        "| concurrency | batches | records per batch, median / max | CPU per batch, median / "
        "max | CPU per record |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        w = run["writer"]
        if w["batches"]:
            lines.append(
                f"| {run['concurrency']} | {w['batches']} | {w['records_median']:.0f} / "
                f"{w['records_max']} | {w['cpu_median_ms']:.2f} / {w['cpu_max_ms']:.2f} ms | "
                f"{w['cpu_per_record_us']:.0f} µs |"
            )
    lines += [
        "",
        "Collections during the timing runs (gc.callbacks; all threads; wall time, and the "
        "collecting thread's CPU time)",
        "| concurrency | generation | collections | per 1000 requests | objects freed | "
        "median | max | total | CPU median / max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for generation, figures in run["collections"].items():
            lines.append(
                f"| {run['concurrency']} | {generation} | {figures['count']} | "
                f"{figures['count'] / run['requests'] * 1000:.1f} | {figures['collected']} | "
                f"{figures['median_ms']:.2f} ms | {figures['max_ms']:.2f} ms | "
                f"{figures['total_ms']:.1f} ms | {figures['cpu_median_ms']:.2f} / "
                f"{figures['cpu_max_ms']:.2f} ms |"
            )
    return lines


async def run(bench: GcBench, total: int, with_timing: bool) -> str:
    found = [
        await bench.garbage(total),
        await bench.garbage(max(total // STREAM_SHARE, 1), STREAM),
    ]
    timing = [await bench.timing(total, c) for c in (1, 32)] if with_timing else []
    lines = [
        f"Gateway garbage and event-loop lag  ({machine_description()})",
        "Gateway: uvicorn bench/gc_probe.py (config.asgi:application and a probe), one worker, "
        "PostgreSQL + Redis, usage and attribution rows written for every request.",
        "",
        *garbage_report(found[0]),
        "",
        *garbage_report(found[1]),
    ]
    if timing:
        lines += ["", *timing_report(timing)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="Requests per phase.")
    parser.add_argument(
        "--garbage-only", action="store_true", help="Count garbage; skip the timing runs."
    )
    args = parser.parse_args()
    env = configure_environment()
    progress("preparing the bench database and Redis DB")
    create_database()
    setup_django()
    text = serve_and_measure(
        env,
        lambda *servers: run(GcBench(*servers), args.requests, not args.garbage_only),
        app=PROBE_APP,
        app_dir=os.path.dirname(os.path.abspath(__file__)),
    )
    print()
    print(text)


if __name__ == "__main__":
    main()
