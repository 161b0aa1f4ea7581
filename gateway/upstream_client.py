"""The one HTTP client stack to partners (SPEC §8): aiohttp, one pooled session per worker.

aiohttp is called directly: httpx's pool (httpcore over anyio) cost ~0.7 ms of CPU per
upstream call at one client and ~2 ms at 32, aiohttp's 0.1–0.2 ms (bench/RESULTS.md).
Every aiohttp failure becomes a gateway error in one place, ``gateway_error``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings
from multidict import CIMultiDictProxy

from experiments.models import RequestKind
from gateway import errors
from gateway.errors import GatewayError
from gateway.routing import Route

logger = logging.getLogger(__name__)

UPSTREAM_PATHS = {
    RequestKind.CHAT_COMPLETIONS: "/chat/completions",
    RequestKind.RESPONSES: "/responses",
    RequestKind.MESSAGES: "/messages",
}
#: Client headers that may travel upstream. Never credentials, cookies or forwarding headers.
FORWARDED_REQUEST_HEADERS = ("accept", "anthropic-version", "anthropic-beta")
#: Connections per worker to all partners together, as the httpx pool had.
MAX_CONNECTIONS = 512


def gateway_error(exc: BaseException, *, body_started: bool) -> GatewayError:
    """The one mapping of a failed partner exchange to what the client is told.

    ``body_started``: the response head had arrived, so a broken connection is a cut
    response rather than an unreachable partner.
    """
    # aiohttp's own timeouts (connect, pool wait, between two reads) are TimeoutErrors.
    if isinstance(exc, TimeoutError):
        return errors.upstream_timeout()
    if body_started:
        return errors.upstream_cut()
    if isinstance(exc, aiohttp.ClientResponseError):
        # The partner answered, but not in HTTP we can read (bad status line or headers).
        return errors.upstream_malformed()
    return errors.upstream_unreachable()


@contextmanager
def _mapped_errors(*, body_started: bool) -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise gateway_error(exc, body_started=body_started) from None


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    content: bytes


def upstream_request(request, route: Route, kind: str, body: dict) -> UpstreamRequest:
    """The partner call for a client request: allowlisted headers, the partner key, the body."""
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


class UpstreamResponse:
    """A partner response whose head has arrived; its body is read or streamed once."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status: int = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    @property
    def is_event_stream(self) -> bool:
        return self._response.content_type == "text/event-stream"

    async def read(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes after decoding; more is a 502.

        A careless partner (or a compression bomb) must not make a worker buffer without
        bound: a declared length over the limit is refused before reading, an undeclared
        one is cut off as soon as it passes the limit.
        """
        declared = self._response.content_length
        if declared is not None and declared > limit:
            raise errors.upstream_too_large()
        body = bytearray()
        with _mapped_errors(body_started=True):
            async for chunk in self._response.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise errors.upstream_too_large()
        return bytes(body)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Whatever arrived, as it arrives (so SSE events are relayed without waiting)."""
        with _mapped_errors(body_started=True):
            async for chunk in self._response.content.iter_any():
                yield chunk

    def close(self, *, reusable: bool) -> None:
        """Hand the connection back to the pool when the body was read whole, else drop it."""
        if reusable:
            self._response.release()
        else:
            self._response.close()


class UpstreamClient:
    """One ``aiohttp.ClientSession`` per event loop (uvicorn runs one loop per worker).

    No cookie jar: a partner's ``Set-Cookie`` for one user must never travel upstream
    with the next user's request. No proxy from the environment, no redirects.
    """

    def __init__(self) -> None:
        # Keyed by the loop itself (not its id, which a later loop may reuse).
        self._sessions: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, aiohttp.ClientSession
        ] = weakref.WeakKeyDictionary()

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            timeout = settings.GATEWAY_UPSTREAM_TIMEOUT
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # Waiting for a pooled connection plus connecting.
                    connect=timeout,
                    sock_connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
                    # Between two reads of the response: a stream may run long, never stall.
                    sock_read=timeout,
                ),
                trust_env=False,
                # Bodies are parsed to be blinded, so a compressed answer is decoded here.
                auto_decompress=True,
            )
            self._sessions[loop] = session
        return session

    async def send(self, outgoing: UpstreamRequest) -> UpstreamResponse:
        """POST to the partner; returns once the response head arrived (body not read)."""
        with _mapped_errors(body_started=False):
            response = await self.session().post(
                outgoing.url,
                data=outgoing.content,
                headers=outgoing.headers,
                allow_redirects=False,
            )
        return UpstreamResponse(response)

    async def get_json(self, url: str, headers: dict[str, str]) -> Any:
        """GET a JSON document (raises GatewayError, or ValueError when it is not JSON)."""
        with _mapped_errors(body_started=False):
            async with self.session().get(url, headers=headers, allow_redirects=False) as response:
                if response.status >= 400:
                    raise errors.upstream_malformed()
                raw = await UpstreamResponse(response).read(
                    settings.GATEWAY_MAX_UPSTREAM_BODY_BYTES
                )
        return json.loads(raw)

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), weakref.WeakKeyDictionary()
        for session in sessions:
            await session.close()


shared_client = UpstreamClient()


async def fetch_default_models() -> list[str]:
    """Model ids of the default upstream, for ``GET /v1/models``; empty on any failure."""
    base_url = settings.GATEWAY_DEFAULT_UPSTREAM_BASE_URL.rstrip("/")
    if not base_url:
        return []
    api_key = settings.GATEWAY_DEFAULT_UPSTREAM_API_KEY
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        listing = await shared_client.get_json(base_url + "/models", headers)
        return [
            item["id"]
            for item in listing.get("data", [])
            if isinstance(item, dict)
            and isinstance(item.get("id"), str)
            # An id echoing the key is no model a client could call: left out.
            and not (api_key and api_key in item["id"])
        ]
    except (GatewayError, ValueError, AttributeError) as exc:
        logger.warning("default upstream model list unavailable (%s)", type(exc).__name__)
        return []
