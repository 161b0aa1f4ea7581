"""The one pooled HTTP client per worker, and how an upstream request is built (SPEC §8).

aiohttp rather than httpx: on the gateway's hot path httpx (httpcore over anyio) cost
0.7 ms of CPU per upstream call at one client and ~2 ms at 32, mostly its connection pool
checking every idle connection's socket on each request; aiohttp costs 0.1-0.2 ms for the
same call (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import aiohttp
from django.conf import settings

from experiments.models import RequestKind
from gateway.routing import Route

logger = logging.getLogger(__name__)

UPSTREAM_PATHS = {
    RequestKind.CHAT_COMPLETIONS: "/chat/completions",
    RequestKind.RESPONSES: "/responses",
    RequestKind.MESSAGES: "/messages",
}
#: Client headers that may travel upstream. Never credentials, cookies or forwarding headers.
FORWARDED_REQUEST_HEADERS = ("accept", "anthropic-version", "anthropic-beta")


#: What a failed upstream exchange raises (besides ``TimeoutError``, checked first):
#: refused or reset connections, bad URLs, cut or malformed HTTP.
UpstreamConnectionError = (aiohttp.ClientError, OSError)


class SharedClient:
    """One ``aiohttp.ClientSession`` per event loop (uvicorn runs one loop per worker)."""

    def __init__(self) -> None:
        self._clients: dict[int, aiohttp.ClientSession] = {}

    def get(self) -> aiohttp.ClientSession:
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None or client.closed:
            timeout = settings.GATEWAY_UPSTREAM_TIMEOUT
            client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # Waiting for a pooled connection, as httpx's pool timeout did.
                    connect=timeout,
                    sock_connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
                    # Between two reads of the response, like httpx's read timeout.
                    sock_read=timeout,
                ),
                trust_env=False,
                raise_for_status=False,
            )
            self._clients[loop_id] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


shared_client = SharedClient()


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    content: bytes


def upstream_request(request, route: Route, kind: str, body: dict) -> UpstreamRequest:
    headers = {"content-type": "application/json"}
    for name in FORWARDED_REQUEST_HEADERS:
        value = request.headers.get(name)
        if value:
            headers[name] = value
    if route.api_key:
        headers["authorization"] = f"Bearer {route.api_key}"
        if kind == RequestKind.MESSAGES:
            headers["x-api-key"] = route.api_key
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return UpstreamRequest(route.base_url + UPSTREAM_PATHS[kind], headers, content)


async def send_upstream(outgoing: UpstreamRequest) -> aiohttp.ClientResponse:
    """POST to the partner; returns once the response headers arrived (body not read)."""
    return await shared_client.get().post(
        outgoing.url, data=outgoing.content, headers=outgoing.headers, allow_redirects=False
    )


async def fetch_default_models() -> list[str]:
    """Model ids of the default upstream, for ``GET /v1/models``; empty on any failure."""
    base_url = settings.GATEWAY_DEFAULT_UPSTREAM_BASE_URL.rstrip("/")
    if not base_url:
        return []
    headers = {}
    if settings.GATEWAY_DEFAULT_UPSTREAM_API_KEY:
        headers["authorization"] = f"Bearer {settings.GATEWAY_DEFAULT_UPSTREAM_API_KEY}"
    try:
        async with shared_client.get().get(
            base_url + "/models", headers=headers, allow_redirects=False
        ) as response:
            response.raise_for_status()
            listing = await response.json(content_type=None)
        return [
            str(item["id"])
            for item in listing.get("data", [])
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        ]
    except (*UpstreamConnectionError, TimeoutError, ValueError, AttributeError) as exc:
        logger.warning("default upstream model list unavailable (%s)", type(exc).__name__)
        return []
