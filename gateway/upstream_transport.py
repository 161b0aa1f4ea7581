"""An httpx transport that sends through one pooled aiohttp session.

The gateway talks to partners through ``httpx.AsyncClient`` (one per worker), but
httpx's own connection pool (httpcore over anyio) cost ~0.7 ms of CPU per upstream
call at one client and ~2 ms at 32, more than the rest of the gateway together;
aiohttp's pool does the same call for 0.1–0.2 ms (bench/RESULTS.md). Keeping httpx's
client API on top keeps requests, responses, timeouts and errors in one vocabulary.

aiohttp failures are mapped onto httpx's exceptions explicitly, most specific first,
so the gateway's error mapping (timeout → 504, connection failure → 502, cut stream →
error event) holds whichever library raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx

#: aiohttp exception → httpx exception, most specific first (first match wins).
_EXCEPTION_MAP: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientError, httpx.NetworkError),
    (OSError, httpx.NetworkError),
)


@contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        for source, target in _EXCEPTION_MAP:
            if isinstance(exc, source):
                # The message is aiohttp's (host and port at most; never headers).
                raise target(str(exc) or type(exc).__name__) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            # iter_any: hand over whatever arrived, so SSE events are relayed as they come.
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (and connection pool) for every request of this transport."""

    def __init__(self, *, max_connections: int = 512) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                trust_env=False,
                auto_decompress=False,  # httpx decodes content-encoding itself
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.multi_items() if k != "transfer-encoding"]
        with _httpx_errors():
            response = await self._get_session().request(
                request.method,
                str(request.url),
                headers=headers,
                data=await request.aread() or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
