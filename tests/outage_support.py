"""Shared by the database-outage tests (fixtures ``database_proxy`` and ``start_gateway``
live in conftest.py): requests, a crash, and the exactly-once check by client request id."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import httpx

from experiments.models import ExperimentRequest
from gateway.models import GatewayUsage
from tests.gateway_server import GatewayServer, wait_until

CHAT = [{"role": "user", "content": "is the evidence kept?"}]


def kill(server: GatewayServer) -> None:
    """SIGKILL: no shutdown hook, no flush, exactly like a crash."""
    server.process.kill()
    server.process.wait(timeout=10)


def ask(gateway: GatewayServer, model: str, request_id: str, **headers: str) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": model, "messages": CHAT},
        headers={"x-kilo-request": request_id, "x-kilocode-machineid": "outage-probe", **headers},
        timeout=10,
    )


def rows_per_request(request_ids: Iterable[str]) -> Counter:
    ids = list(request_ids)
    return Counter(
        ExperimentRequest.objects.filter(client_request_id__in=ids).values_list(
            "client_request_id", flat=True
        )
    )


def assert_rows_exactly_once(request_ids: Iterable[str], *, timeout: float = 30.0) -> None:
    """Wait until every request has its attribution row; then each has exactly one, with
    its usage row, and no other rows exist."""
    ids = set(request_ids)
    wait_until(lambda: len(rows_per_request(ids)) == len(ids), timeout=timeout)
    counts = rows_per_request(ids)
    assert set(counts.values()) == {1}, {rid: n for rid, n in counts.items() if n != 1}
    assert ExperimentRequest.objects.count() == GatewayUsage.objects.count() == len(ids)
