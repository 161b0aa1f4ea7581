"""The gateway's ASGI application with a measuring probe, for ``bench/bench_gc.py`` only.

Served by uvicorn exactly as ``config.asgi:application`` is, plus a few ``/__probe/`` paths
answered before the gateway sees them:

* ``POST /__probe/garbage/start``: a full collection, then ``gc.DEBUG_SAVEALL``, so that
  every object the collector finds unreachable from now on is kept in ``gc.garbage``
  instead of freed: a count, not a timing.
* ``POST /__probe/garbage/stop``: a full collection; answers the unreachable objects since
  ``start``, grouped by type (frames, coroutines and functions by code name), and the
  tracked objects before and after; clears ``gc.DEBUG_SAVEALL``.
* ``POST /__probe/heap``: the tracked objects a full collection walks (the frozen ones
  excepted), by type.
* ``POST /__probe/timing/start``: starts recording collections (``gc.callbacks``), the usage
  writer thread's batches (``UsageWriter._write``, wrapped) and a ticker task's lateness
  (the event-loop lag: how long a ready callback waited).
* ``POST /__probe/timing/stop``: answers all three, each late tick attributed to what
  overlapped it (a full collection, a young one, a writer batch, or nothing of these: the
  requests themselves and the machine), and the OS run-queue wait of the loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.asgi import application as gateway_application  # noqa: E402
from gateway.usage import writer  # noqa: E402

#: The ticker's period: short enough to sample every stall of a millisecond or more, long
#: enough that its own CPU (a wake-up every 5 ms) is noise in the CPU per request.
TICK_SECONDS = 0.005
#: Lateness counted as a stall when attributing ticks.
STALL_SECONDS = 0.001


def percentiles(values: list[float]) -> dict:
    """p50/p99/max in ms, and how many values are over 2 and 5 ms."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": ordered[-1] * 1000,
        "over_2ms": sum(1 for value in ordered if value > 0.002),
        "over_5ms": sum(1 for value in ordered if value > 0.005),
    }


class Recorder:
    """Intervals (perf_counter) of collections and writer batches, and the ticker's ticks."""

    def __init__(self) -> None:
        self.reset()
        gc.callbacks.append(self._on_collection)
        write = writer._write

        def timed_write(batch: list) -> None:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                write(batch)
            finally:
                self.batches.append(
                    (started, time.perf_counter(), time.thread_time() - cpu, len(batch))
                )

        writer._write = timed_write

    def reset(self) -> None:
        #: (start, end, generation, objects freed, CPU seconds of the collecting thread)
        self.collections: list[tuple[float, float, int, int, float]] = []
        #: (start, end, thread CPU seconds, records)
        self.batches: list[tuple[float, float, float, int]] = []
        #: (when the tick was due, when it ran)
        self.ticks: list[tuple[float, float]] = []
        self._collection_started = self._collection_cpu = 0.0
        self._ticker: asyncio.Task | None = None
        self._loop_thread = threading.get_native_id()
        self._runqueue_start = self._runqueue_wait()

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._collection_cpu = time.thread_time()
            self._collection_started = time.perf_counter()
            return
        ended, cpu = time.perf_counter(), time.thread_time() - self._collection_cpu
        started = self._collection_started
        self.collections.append((started, ended, info["generation"], info["collected"], cpu))

    async def _tick(self) -> None:
        while True:
            due = time.perf_counter() + TICK_SECONDS
            await asyncio.sleep(TICK_SECONDS)
            self.ticks.append((due, time.perf_counter()))

    def _runqueue_wait(self) -> float:
        """Seconds the loop's thread has waited for a CPU (``schedstat``: machine load)."""
        try:
            with open(f"/proc/self/task/{self._loop_thread}/schedstat") as stat:
                return int(stat.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError, AttributeError):
            return 0.0

    def start(self) -> None:
        self.reset()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> dict:
        self._ticker.cancel()
        await asyncio.wait([self._ticker])
        return {
            "collections": self.collection_summary(),
            "writer": self.writer_summary(),
            "loop_lag": percentiles([max(0.0, ran - due) for due, ran in self.ticks]),
            "lag_by_cause": self.lag_by_cause(),
            "loop_runqueue_wait_ms": (self._runqueue_wait() - self._runqueue_start) * 1000,
        }

    def collection_summary(self) -> dict:
        summary = {}
        for generation in (0, 1, 2):
            runs = [c for c in self.collections if c[2] == generation]
            durations = [c[1] - c[0] for c in runs]
            cpu = [c[4] for c in runs]
            summary[str(generation)] = {
                "count": len(runs),
                "collected": sum(c[3] for c in runs),
                "cpu_median_ms": statistics.median(cpu) * 1000 if cpu else 0.0,
                "cpu_max_ms": max(cpu, default=0.0) * 1000,
                "median_ms": statistics.median(durations) * 1000 if durations else 0.0,
                "max_ms": max(durations, default=0.0) * 1000,
                "total_ms": sum(durations) * 1000,
            }
        return summary

    def writer_summary(self) -> dict:
        if not self.batches:
            return {"batches": 0}
        sizes = [b[3] for b in self.batches]
        cpu = [b[2] for b in self.batches]
        return {
            "batches": len(self.batches),
            "records_median": statistics.median(sizes),
            "records_max": max(sizes),
            "cpu_median_ms": statistics.median(cpu) * 1000,
            "cpu_max_ms": max(cpu) * 1000,
            "cpu_per_record_us": sum(cpu) / sum(sizes) * 1e6,
        }

    def lag_by_cause(self) -> dict:
        """Late ticks (over ``STALL_SECONDS``) by what overlapped their wait, first match of:
        a full collection, a young collection, a writer batch, none of these."""
        causes = [
            ("full collection", [(c[0], c[1]) for c in self.collections if c[2] == 2]),
            ("young collection", [(c[0], c[1]) for c in self.collections if c[2] < 2]),
            ("writer batch", [(s, e) for s, e, _, _ in self.batches]),
        ]
        late: dict[str, list[float]] = collections.defaultdict(list)
        for due, ran in self.ticks:
            lateness = ran - due
            if lateness <= STALL_SECONDS:
                continue
            cause = next(
                (
                    name
                    for name, spans in causes
                    if any(start < ran and end > due for start, end in spans)
                ),
                "none of these",
            )
            late[cause].append(lateness)
        return {cause: percentiles(values) for cause, values in late.items()}


def type_name(obj: object) -> str:
    kind = type(obj)
    if kind.__name__ == "frame":
        return f"frame {obj.f_code.co_qualname}"
    if kind.__name__ in ("coroutine", "function", "async_generator", "generator"):
        return f"{kind.__name__} {obj.__qualname__}"
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


recorder = Recorder()
_tracked_at_start = 0


def start_garbage() -> dict:
    global _tracked_at_start
    gc.set_debug(0)
    gc.collect()
    gc.garbage.clear()
    _tracked_at_start = len(gc.get_objects())
    gc.set_debug(gc.DEBUG_SAVEALL)
    return {"tracked": _tracked_at_start}


def stop_garbage() -> dict:
    gc.collect()
    gc.set_debug(0)
    garbage, gc.garbage[:] = list(gc.garbage), []
    by_type = collections.Counter(type_name(obj) for obj in garbage)
    del garbage
    gc.collect()
    return {
        "unreachable": sum(by_type.values()),
        "by_type": by_type.most_common(),
        "tracked_before": _tracked_at_start,
        "tracked_after": len(gc.get_objects()),
    }


def settings() -> dict:
    return {
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "gc_threshold": gc.get_threshold(),
        "gc_frozen": gc.get_freeze_count(),
        "gc_tracked": len(gc.get_objects()),
    }


async def answer(send, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def probe(path: str, send) -> None:
    if path == "/__probe/garbage/start":
        await answer(send, start_garbage())
    elif path == "/__probe/garbage/stop":
        await answer(send, stop_garbage())
    elif path == "/__probe/heap":
        by_type = collections.Counter(type_name(obj) for obj in gc.get_objects())
        await answer(send, {"tracked": sum(by_type.values()), "by_type": by_type.most_common(40)})
    elif path == "/__probe/timing/start":
        recorder.start()
        await answer(send, {"started": True})
    elif path == "/__probe/timing/stop":
        await answer(send, {**await recorder.stop(), "settings": settings()})
    else:
        await answer(send, {"unknown": path})


async def application(scope, receive, send) -> None:
    if scope["type"] == "http" and scope["path"].startswith("/__probe/"):
        await probe(scope["path"], send)
        return
    await gateway_application(scope, receive, send)
