"""A minimal HTTP/1.1 keep-alive load client on raw asyncio streams.

Deliberately tiny: on a 2-core machine a full client library would take CPU from the servers
being measured. Handles Content-Length and chunked bodies, and timestamps every SSE event.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    status: int
    latency: float
    ttfb: float
    #: Arrival time (seconds after the request was sent) of each SSE event, for streams.
    event_times: list[float] = field(default_factory=list)


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def post(self, path: str, body: dict, headers: dict[str, str]) -> Result:
        if self.writer is None:
            await self._connect()
        payload = json.dumps(body).encode()
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ] + [f"{k}: {v}" for k, v in headers.items()]
        started = time.perf_counter()
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        raw_head = await self.reader.readuntil(b"\r\n\r\n")
        ttfb = time.perf_counter() - started
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        response_headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                response_headers[name.strip().lower()] = value.strip()
        event_times: list[float] = []
        if response_headers.get("transfer-encoding", "").lower() == "chunked":
            pending = b""
            first = True
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                now = time.perf_counter() - started
                if first and size:
                    ttfb, first = now, False
                if size == 0:
                    break
                pending += chunk[:-2]
                while b"\n\n" in pending:
                    _, pending = pending.split(b"\n\n", 1)
                    event_times.append(now)
        else:
            await self.reader.readexactly(int(response_headers.get("content-length", "0")))
        latency = time.perf_counter() - started
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return Result(status, latency, ttfb, event_times)


async def run_load(
    host: str,
    port: int,
    path: str,
    make_request,
    *,
    total: int,
    concurrency: int,
) -> tuple[list[Result], float]:
    """Send ``total`` requests from ``concurrency`` keep-alive connections; (results, wall s).

    ``make_request(i)`` returns (body, headers) for request number i.
    """
    counter = iter(range(total))
    results: list[Result] = []

    async def worker() -> None:
        connection = Connection(host, port)
        try:
            for index in counter:
                body, headers = make_request(index)
                results.append(await connection.post(path, body, headers))
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started
