"""Load: 5,000 requests at 64 concurrent clients, every one accounted for."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.gateway_server import requires_server, wait_for_rows
from tests.gateway_support import active_experiment, wait_listed

pytestmark = requires_server

REQUESTS = 5_000
CONCURRENCY = 64


async def _drive(base_url: str, experimented: str) -> Counter:
    statuses: Counter = Counter()
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:

        async def one(index: int) -> None:
            # Every other request is experimented; the rest go to the default upstream.
            model = experimented if index % 2 == 0 else "partner/plain-model"
            async with gate:
                response = await client.post(
                    "/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": f"n{index}"}]},
                    headers={"x-kilocode-machineid": f"load-{index % 500}"},
                )
                statuses[response.status_code] += 1

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return statuses


def test_5000_requests_at_64_concurrency_write_exactly_one_row_each(
    gateway_factory, transactional_db, upstream
):
    server = gateway_factory(GATEWAY_DEFAULT_UPSTREAM_BASE_URL=upstream.base_url)
    exp = active_experiment(upstream)
    wait_listed(server, exp.public_model_id)
    statuses = asyncio.run(_drive(server.base_url, exp.public_model_id))
    assert statuses == Counter({200: REQUESTS})
    wait_for_rows(REQUESTS, REQUESTS // 2, timeout=120)
