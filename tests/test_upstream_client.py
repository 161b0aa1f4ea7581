"""The client to partners (aiohttp) against real loopback sockets: its one error mapping,
streaming as bytes arrive, and no cookies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.errors import GatewayError
from gateway.upstream_client import UpstreamClient, UpstreamRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def partner_client() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient()
    try:
        yield client
    finally:
        await client.aclose()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def post(url: str, **headers: str) -> UpstreamRequest:
    return UpstreamRequest(url, {"content-type": "application/json", **headers}, b"{}")


def run(coroutine) -> object:
    return asyncio.run(coroutine)


def error_sending_to(handler: Handler) -> GatewayError:
    """What sending one request to a partner answering with ``handler`` raises."""

    async def scenario():
        async with serving(handler) as base, partner_client() as client:
            await client.send(post(base + "/x"))

    with pytest.raises(GatewayError) as raised:
        run(scenario())
    return raised.value


def test_a_refused_connection_is_502_upstream_unreachable():
    async def scenario():
        async with partner_client() as client:
            await client.send(post(f"http://127.0.0.1:{closed_port()}/v1/chat/completions"))

    with pytest.raises(GatewayError) as raised:
        run(scenario())
    assert (raised.value.status, raised.value.code) == (502, "upstream_unreachable")


def test_a_partner_that_accepts_and_never_answers_is_504(settings):
    settings.GATEWAY_UPSTREAM_TIMEOUT = 0.3

    async def never_answers(reader, writer):
        await read_request(reader)
        await asyncio.Event().wait()  # holds the connection open, silent, until cancelled

    error = error_sending_to(never_answers)
    assert (error.status, error.code) == (504, "upstream_timeout")


def test_an_answer_that_is_not_http_is_502_upstream_malformed():
    async def babbles(reader, writer):
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    error = error_sending_to(babbles)
    assert (error.status, error.code) == (502, "upstream_malformed")


def test_a_stream_cut_mid_way_is_an_upstream_cut_after_the_bytes_that_came():
    async def cuts(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\n"
            b"data: {}\n\n"
        )
        await writer.drain()
        writer.close()

    received = []

    async def scenario():
        async with serving(cuts) as base, partner_client() as client:
            response = await client.send(post(base + "/x"))
            assert response.status == 200 and response.is_event_stream
            try:
                async for chunk in response.chunks():
                    received.append(chunk)
            finally:
                response.close(reusable=False)

    with pytest.raises(GatewayError) as raised:
        run(scenario())
    assert (raised.value.status, raised.value.code) == (502, "upstream_stream_cut")
    assert b"".join(received) == b"data: {}\n\n"


def test_chunks_are_handed_over_as_they_arrive():
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

    async def scenario():
        async with serving(two_chunks) as base, partner_client() as client:
            response = await client.send(post(base + "/x"))
            chunks = response.chunks()
            # The first chunk must arrive while the partner still holds back the second.
            first = await asyncio.wait_for(chunks.__anext__(), 5)
            release.set()
            rest = b"".join([chunk async for chunk in chunks])
            response.close(reusable=True)
            return first, rest

    assert run(scenario()) == (b"first\n", b"second\n")


def test_no_cookie_set_by_the_partner_is_sent_back_on_the_next_request():
    heads: list[bytes] = []

    async def sets_cookies(reader, writer):
        while not reader.at_eof():
            try:
                heads.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                b"set-cookie: partner_session=user-1; Path=/\r\n\r\n{}"
            )
            await writer.drain()

    async def scenario():
        async with serving(sets_cookies) as base, partner_client() as client:
            # A host name, not an IP: aiohttp's default jar would keep this cookie.
            base = base.replace("127.0.0.1", "localhost")
            for _ in range(2):
                response = await client.send(post(base + "/x"))
                assert await response.read(1024) == b"{}"
                response.close(reusable=True)

    run(scenario())
    assert len(heads) == 2
    assert all(b"cookie" not in head.lower().replace(b"set-cookie", b"") for head in heads)


def test_request_headers_and_body_reach_the_partner_unchanged():
    seen: dict[str, bytes] = {}

    async def records(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen["head"] = head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        seen["body"] = await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    async def scenario():
        async with serving(records) as base, partner_client() as client:
            outgoing = UpstreamRequest(base + "/x", {"authorization": "Bearer k"}, b'{"a":1}')
            response = await client.send(outgoing)
            await response.read(1024)
            response.close(reusable=True)

    run(scenario())
    assert b"authorization: bearer k" in seen["head"]
    assert seen["body"] == b'{"a":1}'


def _answer_of_size(size: int, *, declared: bool) -> Handler:
    async def answers(reader, writer):
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        head += b"content-length: %d\r\n\r\n" % size if declared else b"connection: close\r\n\r\n"
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()
        writer.close()

    return answers


def body_read_from(handler: Handler, limit: int) -> tuple[bytes | None, GatewayError | None]:
    async def scenario():
        async with serving(handler) as base, partner_client() as client:
            response = await client.send(post(base + "/x"))
            try:
                return await response.read(limit), None
            except GatewayError as error:
                return None, error
            finally:
                response.close(reusable=False)

    return run(scenario())


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_a_body_over_the_limit_is_502_upstream_too_large(declared):
    body, error = body_read_from(_answer_of_size(4 * 65536, declared=declared), 65536)
    assert body is None
    assert (error.status, error.code) == (502, "upstream_too_large")


def test_a_body_at_the_limit_is_read_whole():
    body, error = body_read_from(_answer_of_size(65536, declared=False), 65536)
    assert error is None and body == b"x" * 65536
