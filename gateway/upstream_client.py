"""The one pooled HTTP client per worker, and how an upstream request is built (SPEC §8)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
from django.conf import settings

from experiments.models import RequestKind
from gateway.routing import Route
from gateway.upstream_transport import AiohttpTransport

logger = logging.getLogger(__name__)

UPSTREAM_PATHS = {
    RequestKind.CHAT_COMPLETIONS: "/chat/completions",
    RequestKind.RESPONSES: "/responses",
    RequestKind.MESSAGES: "/messages",
}
#: Client headers that may travel upstream. Never credentials, cookies or forwarding headers.
FORWARDED_REQUEST_HEADERS = ("accept", "anthropic-version", "anthropic-beta")


class SharedClient:
    """One ``httpx.AsyncClient`` per event loop (uvicorn runs one loop per worker).

    Its transport pools connections with aiohttp (see ``upstream_transport`` for why).
    """

    def __init__(self) -> None:
        self._clients: dict[int, httpx.AsyncClient] = {}

    def get(self) -> httpx.AsyncClient:
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None or client.is_closed:
            timeout = settings.GATEWAY_UPSTREAM_TIMEOUT
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(
                    timeout,
                    connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
                    pool=timeout,
                ),
                transport=AiohttpTransport(max_connections=512),
                follow_redirects=False,
                trust_env=False,
            )
            self._clients[loop_id] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


shared_client = SharedClient()


def upstream_request(
    client: httpx.AsyncClient, request, route: Route, kind: str, body: dict
) -> httpx.Request:
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
    return client.build_request(
        "POST", route.base_url + UPSTREAM_PATHS[kind], headers=headers, content=content
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
        response = await shared_client.get().get(base_url + "/models", headers=headers)
        response.raise_for_status()
        return [
            str(item["id"])
            for item in response.json().get("data", [])
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        ]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        logger.warning("default upstream model list unavailable (%s)", type(exc).__name__)
        return []
