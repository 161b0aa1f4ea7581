"""Gateway vs direct, both against the same local demo upstream, on loopback.

Run from the repository root:  python bench/bench_gateway.py  [--quick] [--request-ids]
[--response-capture-rate PERCENT]

Starts the demo upstream and the gateway (uvicorn, one worker) as real servers, then measures
side by side: non-streaming at concurrency 1 and 32 (added median and p99 latency, requests
per second, gateway CPU ms per request including the usage + attribution writes), and
streaming (added time to first byte, added delay per relayed chunk). Direct and gateway runs
alternate in rounds so drift from other load on the machine hits both alike.
Targets: added median <= 2 ms at concurrency 1; gateway CPU <= 2 ms per request.
``--request-ids``: every gateway request carries its own ``X-Kilo-Request`` (the usage writer
then also joins waiting feedback for each batch: one more statement a batch).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

from bench_environment import (
    BENCH_PARTNER_KEY,
    BENCH_PUBLIC_MODEL_ID,
    BENCH_VARIANTS,
    ROOT,
    configure_environment,
    create_database,
    machine_description,
    progress,
    seed_bench_experiment,
    setup_django,
)
from http_load import Result, run_load

TARGET_ADDED_MEDIAN_MS = 2.0
TARGET_CPU_MS = 2.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROUNDS = 2
MESSAGES = [{"role": "user", "content": "hello from the benchmark, how are you today?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_listening(port: int, process: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not start listening on {port}")


def usage_rows() -> int:
    from gateway.models import GatewayUsage

    return GatewayUsage.objects.count()


def wait_for_usage_rows(expected: int) -> None:
    """Block until the gateway's background writer has written ``expected`` rows in total."""
    deadline = time.monotonic() + 120
    while usage_rows() < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"usage rows stuck at {usage_rows()}, expected {expected}")
        time.sleep(0.05)


class Bench:
    def __init__(
        self, gateway_port: int, upstream_port: int, gateway_pid: int, request_ids: bool = False
    ) -> None:
        self.gateway_port = gateway_port
        self.upstream_port = upstream_port
        self.gateway_pid = gateway_pid
        self.request_ids = request_ids
        self.run_id = uuid.uuid4().hex[:12]

    def request(self, target: str, extra: dict | None = None):
        extra = extra or {}
        if target == "gateway":

            def make(index: int):
                body = {"model": BENCH_PUBLIC_MODEL_ID, "messages": MESSAGES, **extra}
                headers = {"X-KiloCode-MachineId": f"bench-machine-{index % 512}"}
                if self.request_ids:
                    headers["X-Kilo-Request"] = f"bench-{self.run_id}-{index}"
                return body, headers

            return self.gateway_port, make
        # Direct: what the gateway itself sends, to the checkpoint of variant "a".
        internal_id = BENCH_VARIANTS[0][1]

        def make_direct(index: int):
            body = {"model": internal_id, "messages": MESSAGES, **extra}
            return body, {"Authorization": f"Bearer {BENCH_PARTNER_KEY}"}

        return self.upstream_port, make_direct

    async def load(self, target: str, total: int, concurrency: int, extra=None):
        port, make = self.request(target, extra)
        results, wall = await run_load(
            "127.0.0.1", port, "/v1/chat/completions", make, total=total, concurrency=concurrency
        )
        failed = [r.status for r in results if r.status != 200]
        if failed:
            raise SystemExit(f"{target}: {len(failed)} non-200 answers, e.g. {failed[:5]}")
        return results, wall

    async def non_streaming(self, total: int, concurrency: int) -> dict:
        progress(f"non-streaming, concurrency {concurrency}: warm-up")
        await self.load("direct", min(200, total), concurrency)
        rows = usage_rows()
        await self.load("gateway", min(200, total), concurrency)
        rows += min(200, total)
        wait_for_usage_rows(rows)
        latencies: dict[str, list[float]] = {"direct": [], "gateway": []}
        walls = {"direct": 0.0, "gateway": 0.0}
        gateway_cpu = 0.0
        per_round = total // ROUNDS
        for round_number in range(1, ROUNDS + 1):
            for target in ("direct", "gateway"):
                progress(
                    f"non-streaming, concurrency {concurrency}: {target}, "
                    f"round {round_number}/{ROUNDS}, {per_round} requests"
                )
                cpu_before = cpu_seconds(self.gateway_pid)
                results, wall = await self.load(target, per_round, concurrency)
                if target == "gateway":
                    rows += per_round
                    wait_for_usage_rows(rows)
                    gateway_cpu += cpu_seconds(self.gateway_pid) - cpu_before
                latencies[target] += [r.latency for r in results]
                walls[target] += wall
        count = per_round * ROUNDS
        return {
            "concurrency": concurrency,
            "requests": count,
            "median": {t: statistics.median(v) * 1000 for t, v in latencies.items()},
            "p99": {t: sorted(v)[int(len(v) * 0.99)] * 1000 for t, v in latencies.items()},
            "rps": {t: count / walls[t] for t in walls},
            "gateway_cpu_ms": gateway_cpu / count * 1000,
        }

    async def streaming(self, total: int, chunks: int, chunk_delay_ms: int) -> dict:
        extra = {"stream": True, "demo_chunks": chunks, "demo_chunk_delay_ms": chunk_delay_ms}
        progress("streaming: warm-up")
        await self.load("direct", 10, 1, extra)
        await self.load("gateway", 10, 1, extra)
        results: dict[str, list[Result]] = {"direct": [], "gateway": []}
        per_round = total // ROUNDS
        for round_number in range(1, ROUNDS + 1):
            for target in ("direct", "gateway"):
                progress(
                    f"streaming: {target}, round {round_number}/{ROUNDS}, {per_round} streams "
                    f"of {chunks} chunks {chunk_delay_ms} ms apart"
                )
                batch, _ = await self.load(target, per_round, 1, extra)
                results[target] += batch
        events = min(len(r.event_times) for rs in results.values() for r in rs)
        ttfb = {t: statistics.median(r.ttfb for r in rs) * 1000 for t, rs in results.items()}
        # For each event position: median arrival time over the streams, per target.
        arrival = {
            t: [statistics.median(r.event_times[k] for r in rs) * 1000 for k in range(events)]
            for t, rs in results.items()
        }
        added_per_event = [
            g - d for g, d in zip(arrival["gateway"], arrival["direct"], strict=True)
        ]
        span = {t: a[-1] - a[0] for t, a in arrival.items()}
        return {
            "streams": per_round * ROUNDS,
            "events": events,
            "chunks": chunks,
            "chunk_delay_ms": chunk_delay_ms,
            "ttfb": ttfb,
            "added_ttfb": ttfb["gateway"] - ttfb["direct"],
            "added_per_chunk": statistics.median(added_per_event),
            "drift_per_chunk": (span["gateway"] - span["direct"]) / max(events - 1, 1),
            "total": {t: a[-1] for t, a in arrival.items()},
        }


def start_servers(
    env: dict[str, str],
    app: str = "config.asgi:application",
    app_dir: str = ".",
    response_capture_rate: str = "0",
):
    """The demo upstream and the gateway (``app``, imported from ``app_dir``) as servers."""
    upstream_port, gateway_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "manage.py", "run_demo_upstream", "--port", str(upstream_port)]
        + ["--api-key-env", "BENCH_PARTNER_KEY"],
        cwd=ROOT,
        env={**env, "BENCH_PARTNER_KEY": BENCH_PARTNER_KEY},
        stdout=subprocess.DEVNULL,
    )
    seed_bench_experiment(
        f"http://127.0.0.1:{upstream_port}/v1", response_capture_rate=response_capture_rate
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--app-dir", app_dir, "--host", "127.0.0.1"]
        + ["--port", str(gateway_port), "--no-access-log", "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    wait_listening(upstream_port, upstream, "demo upstream")
    wait_listening(gateway_port, gateway, "gateway")
    return upstream, gateway, upstream_port, gateway_port


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def report(non_streaming: list[dict], streaming: dict, capture_rate: str = "0") -> str:
    lines = [
        f"Gateway vs direct to the same local demo upstream  ({machine_description()})",
        "Gateway: uvicorn config.asgi:application, one worker, PostgreSQL + Redis, usage and "
        "attribution rows written for every request; answers captured for "
        f"{capture_rate}% of requests.",
        "",
        "Non-streaming chat completions",
        "| concurrency | requests | direct median | gateway median | added median | "
        "direct p99 | gateway p99 | added p99 | direct req/s | gateway req/s | "
        "req/s ratio | gateway CPU/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in non_streaming:
        m, p, r = row["median"], row["p99"], row["rps"]
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {m['direct']:.2f} ms | "
            f"{m['gateway']:.2f} ms | {m['gateway'] - m['direct']:+.2f} ms | "
            f"{p['direct']:.2f} ms | {p['gateway']:.2f} ms | "
            f"{p['gateway'] - p['direct']:+.2f} ms | "
            f"{r['direct']:.0f} | {r['gateway']:.0f} | {r['gateway'] / r['direct']:.2f} | "
            f"{row['gateway_cpu_ms']:.2f} ms |"
        )
    s = streaming
    lines += [
        "",
        f"Streaming chat completions ({s['streams']} streams at concurrency 1, {s['chunks']} "
        f"content chunks {s['chunk_delay_ms']} ms apart, {s['events']} SSE events each)",
        "| | direct | gateway | added |",
        "|---|---|---|---|",
        f"| time to first byte (median) | {s['ttfb']['direct']:.2f} ms | "
        f"{s['ttfb']['gateway']:.2f} ms | {s['added_ttfb']:+.2f} ms |",
        f"| last event arrives (median) | {s['total']['direct']:.2f} ms | "
        f"{s['total']['gateway']:.2f} ms | "
        f"{s['total']['gateway'] - s['total']['direct']:+.2f} ms |",
        f"| added delay per relayed chunk (median over event positions) | | | "
        f"{s['added_per_chunk']:+.2f} ms |",
        f"| extra drift per chunk (spread of first→last event) | | | "
        f"{s['drift_per_chunk']:+.3f} ms |",
        "",
    ]
    c1 = next(row for row in non_streaming if row["concurrency"] == 1)
    added = c1["median"]["gateway"] - c1["median"]["direct"]
    cpu = max(row["gateway_cpu_ms"] for row in non_streaming)
    lines += [
        f"Target: added median <= {TARGET_ADDED_MEDIAN_MS:.0f} ms at concurrency 1: "
        f"{added:.2f} ms ({'meets' if added <= TARGET_ADDED_MEDIAN_MS else 'MISSES'})",
        f"Target: gateway CPU <= {TARGET_CPU_MS:.0f} ms per request: worst {cpu:.2f} ms "
        f"({'meets' if cpu <= TARGET_CPU_MS else 'MISSES'})",
    ]
    return "\n".join(lines)


async def run(bench: Bench, quick: bool, capture_rate: str = "0") -> str:
    scale = 4 if quick else 1
    non_streaming = [
        await bench.non_streaming(total=2000 // scale, concurrency=1),
        await bench.non_streaming(total=6000 // scale, concurrency=32),
    ]
    streaming = await bench.streaming(total=200 // scale, chunks=20, chunk_delay_ms=5)
    return report(non_streaming, streaming, capture_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A quarter of the requests.")
    parser.add_argument(
        "--request-ids",
        action="store_true",
        help="Send an X-Kilo-Request id with every gateway request (feedback joins run).",
    )
    parser.add_argument(
        "--response-capture-rate",
        default="0",
        metavar="PERCENT",
        help="Percent of requests whose answer the gateway captures (default 0).",
    )
    arguments = parser.parse_args()
    quick, rate = arguments.quick, arguments.response_capture_rate
    env = configure_environment()
    progress("preparing the bench database (mx_bench) and Redis DB")
    create_database()
    setup_django()
    text = serve_and_measure(
        env,
        lambda *servers: run(Bench(*servers, request_ids=arguments.request_ids), quick, rate),
        response_capture_rate=rate,
    )
    print()
    print(text)


def serve_and_measure(
    env: dict[str, str],
    measure: Callable[[int, int, int], Awaitable[str]],
    app: str = "config.asgi:application",
    app_dir: str = ".",
    response_capture_rate: str = "0",
) -> str:
    """Start the servers, run ``measure(gateway_port, upstream_port, gateway_pid)`` on an
    event loop, stop the servers; what ``measure`` returned."""
    upstream, gateway, upstream_port, gateway_port = start_servers(
        env, app, app_dir, response_capture_rate
    )
    # Row counts are read between load runs, never during one: blocking there is harmless.
    # Set after the servers started so the gateway keeps Django's async safety checks.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        progress(f"gateway pid {gateway.pid} on :{gateway_port}, demo upstream on :{upstream_port}")
        return asyncio.run(measure(gateway_port, upstream_port, gateway.pid))
    finally:
        stop(gateway)
        stop(upstream)


if __name__ == "__main__":
    main()
