"""The gateway's httpx transport over aiohttp, against real loopback sockets."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from gateway.upstream_transport import AiohttpTransport

# anyio's pytest plugin (installed with httpx) runs the async tests.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def serve(handler) -> tuple[asyncio.base_events.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    if length:
        await reader.readexactly(length)


def client(**timeouts) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=AiohttpTransport(), timeout=httpx.Timeout(timeouts.pop("read", 5.0), **timeouts)
    )


async def test_refused_connection_is_an_httpx_connect_error():
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{closed_port()}/v1/chat/completions", content=b"{}")


async def test_silent_upstream_is_an_httpx_read_timeout():
    async def never_answers(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    server, base = await serve(never_answers)
    async with server, client(read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(base + "/x", content=b"{}")


async def test_body_cut_mid_way_is_an_httpx_transport_error_while_streaming():
    async def cuts(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\n"
        )
        writer.write(b"data: {}\n\n")
        await writer.drain()
        writer.close()

    server, base = await serve(cuts)
    async with (
        server,
        client() as http,
        http.stream("POST", base + "/x", content=b"{}") as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.TransportError):
            async for _ in response.aiter_bytes():
                pass


async def test_chunks_are_handed_over_as_they_arrive():
    release = asyncio.Event()

    async def two_chunks(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\nfirst\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, base = await serve(two_chunks)
    async with (
        server,
        client() as http,
        http.stream("POST", base + "/x", content=b"{}") as response,
    ):
        chunks = response.aiter_bytes()
        # The first chunk must arrive while the server still holds back the second.
        assert await asyncio.wait_for(chunks.__anext__(), 5) == b"first\n"
        release.set()
        assert b"".join([chunk async for chunk in chunks]) == b"second\n"


async def test_request_headers_and_body_reach_the_upstream_unchanged():
    seen: dict[str, bytes] = {}

    async def records(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen["head"] = head.lower()
        seen["body"] = await reader.readexactly(
            int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    server, base = await serve(records)
    async with server, client() as http:
        response = await http.post(
            base + "/x", content=b'{"a":1}', headers={"authorization": "Bearer k"}
        )
    assert response.json() == {}
    assert b"authorization: bearer k" in seen["head"]
    assert seen["body"] == b'{"a":1}'
