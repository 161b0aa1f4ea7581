"""A database outage under steady load: rows lost, spool peak size, drain time.

Run from the repository root:  python bench/bench_outage.py  [--outage 60] [--rate 100]

Starts the demo upstream and the gateway (uvicorn, one worker) as real servers; the gateway
reaches PostgreSQL through a TCP proxy this script cuts (tests/faults.py). A steady load
(``--rate`` requests/s, each with its own X-Kilo-Request id) runs before, during and after
a ``--outage`` second cut. Printed: requests answered, rows lost (answered requests without
their attribution row once the spool has drained), the spool folder's peak size, and the
drain time (database back → every row answered so far in the database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench_environment import (
    BENCH_PUBLIC_MODEL_ID,
    ROOT,
    configure_environment,
    create_database,
    machine_description,
    progress,
    setup_django,
)
from bench_gateway import start_servers, stop
from http_load import Connection

WARM_SECONDS = 5.0
#: Load kept after the restore, at most: the drain is measured while it runs.
DRAIN_TIMEOUT_SECONDS = 300.0
CONNECTIONS = 16
MESSAGES = [{"role": "user", "content": "hello from the outage benchmark"}]


def spool_bytes(directory: Path) -> int:
    total = 0
    for path in directory.glob("*"):
        with contextlib.suppress(FileNotFoundError):  # deleted by the writer meanwhile
            total += path.stat().st_size
    return total


class PacedLoad:
    """``rate`` requests per second over a few keep-alive connections, until stopped."""

    def __init__(self, port: int, rate: float, run_id: str) -> None:
        self.port, self.rate, self.run_id = port, rate, run_id
        self.answered: list[str] = []
        self.failed = 0
        self.stopping = False
        self._slots: asyncio.Queue[Connection] = asyncio.Queue()

    async def run(self) -> None:
        for _ in range(CONNECTIONS):
            self._slots.put_nowait(Connection("127.0.0.1", self.port))
        loop = asyncio.get_running_loop()
        started, sent, in_flight = loop.time(), 0, set()
        while not self.stopping:
            task = asyncio.create_task(self._one(f"{self.run_id}-{sent}"))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / self.rate - loop.time()))
        await asyncio.gather(*in_flight)
        while not self._slots.empty():
            await self._slots.get_nowait().close()

    async def _one(self, request_id: str) -> None:
        connection = await self._slots.get()
        try:
            body = {"model": BENCH_PUBLIC_MODEL_ID, "messages": MESSAGES}
            headers = {"X-Kilo-Request": request_id, "X-KiloCode-MachineId": request_id}
            result = await connection.post("/v1/chat/completions", body, headers)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.failed += 1
            await connection.close()
        else:
            if result.status == 200:
                self.answered.append(request_id)
            else:
                self.failed += 1
        finally:
            self._slots.put_nowait(connection)


def rows_present(request_ids: list[str]) -> int:
    from experiments.models import ExperimentRequest

    return ExperimentRequest.objects.filter(client_request_id__in=request_ids).count()


async def scenario(load: PacedLoad, proxy, spool_dir: Path, outage: float) -> dict:
    running = asyncio.create_task(load.run())
    peak = 0

    async def watch(seconds: float) -> None:
        nonlocal peak
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, spool_bytes(spool_dir))
            await asyncio.sleep(0.2)

    progress(f"steady load at {load.rate:.0f} requests/s, database up ({WARM_SECONDS:.0f} s)")
    await watch(WARM_SECONDS)
    progress(f"database cut for {outage:.0f} s")
    proxy.cut()
    await watch(outage)
    proxy.restore()
    restored = time.monotonic()
    waiting = list(load.answered)
    progress(f"database restored; {len(waiting)} answered so far; waiting for their rows")
    drain = None
    while time.monotonic() - restored < DRAIN_TIMEOUT_SECONDS:
        await watch(0.2)
        if await asyncio.to_thread(rows_present, waiting) == len(waiting):
            drain = time.monotonic() - restored
            break
    load.stopping = True
    await running
    return {"waiting": waiting, "drain": drain, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=60.0, help="Seconds of cut (60).")
    parser.add_argument("--rate", type=float, default=100.0, help="Requests per second (100).")
    options = parser.parse_args()
    env = configure_environment()
    progress("preparing the bench database and Redis DB")
    create_database()
    setup_django()
    from django.db import connection

    from tests.faults import TcpProxy
    from tests.gateway_server import test_database_url

    database = connection.settings_dict
    proxy = TcpProxy(database["HOST"] or "127.0.0.1", int(database["PORT"] or 5432))
    spool_dir = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    env.update(DATABASE_URL=test_database_url(proxy.address), GATEWAY_SPOOL_DIR=str(spool_dir))
    upstream, gateway, _, gateway_port = start_servers(env)
    try:
        load = PacedLoad(gateway_port, options.rate, uuid.uuid4().hex[:12])
        outcome = asyncio.run(scenario(load, proxy, spool_dir, options.outage))
    finally:
        stop(gateway)
        stop(upstream)
        proxy.close()
        shutil.rmtree(spool_dir, ignore_errors=True)
    waiting = outcome["waiting"]
    lost = len(waiting) - rows_present(waiting)
    drain = outcome["drain"]
    print()
    print(f"Database outage under steady load  ({machine_description()})")
    print(
        f"Gateway: uvicorn config.asgi:application, one worker; PostgreSQL behind a TCP proxy "
        f"cut for {options.outage:.0f} s; {options.rate:.0f} requests/s before, during and after."
    )
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| requests answered before the restore | {len(waiting)} |")
    print(f"| requests not answered 200 | {load.failed} |")
    print(f"| rows lost (answered before the restore, no row after the drain) | {lost} |")
    print(f"| spool peak size | {outcome['peak'] / 1024:.0f} KiB |")
    drained = f"{drain:.2f} s" if drain is not None else f"not within {DRAIN_TIMEOUT_SECONDS:.0f} s"
    print(f"| drain time (database back → every answered row in) | {drained} |")


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
