"""Request bodies over GATEWAY_MAX_BODY_BYTES (SPEC §8 HTTP hygiene): refused before they are read.

A real gateway server driven over raw sockets, so the test controls exactly which bytes the
client sends and can observe that the answer comes before the body does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket

import pytest

from tests.gateway_server import GatewayServer, requires_server

LIMIT = 64 * 1024
GIB = 1024**3
#: How long a client waits for an answer that should come at once.
ANSWER_TIMEOUT = 10


@pytest.fixture
def small_gateway(gateway_factory, transactional_db) -> GatewayServer:
    return gateway_factory(GATEWAY_MAX_BODY_BYTES=str(LIMIT))


def connect(server: GatewayServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_TIMEOUT)


def request_head(*headers: str) -> bytes:
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_what_the_server_takes(sock: socket.socket, data: bytes) -> None:
    """Send, stopping quietly if the server has already answered and closed the connection."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_answer(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def assert_too_large(response: http.client.HTTPResponse) -> None:
    assert response.status == 400
    assert response.getheader("content-type") == "application/json"
    error = json.loads(response.read())["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "too_large")
    # The rest of the body is never read: the connection is not kept for another request.
    assert response.getheader("connection") == "close"


@requires_server
def test_declared_length_over_the_limit_is_refused_before_any_body_is_sent(small_gateway):
    with connect(small_gateway) as sock:
        sock.sendall(request_head(f"Content-Length: {GIB}"))
        # Nothing more is sent: the answer must not wait for (or read) the declared GiB.
        assert_too_large(read_answer(sock))


@requires_server
def test_declared_length_just_over_the_limit_is_refused(small_gateway):
    with connect(small_gateway) as sock:
        sock.sendall(request_head(f"Content-Length: {LIMIT + 1}"))
        send_what_the_server_takes(sock, b" " * (LIMIT + 1))
        assert_too_large(read_answer(sock))


@requires_server
def test_body_of_exactly_the_limit_is_read(small_gateway):
    body = json.dumps({"model": "kilo/no-such-model", "messages": []}).encode()
    body += b" " * (LIMIT - len(body))
    with connect(small_gateway) as sock:
        sock.sendall(request_head(f"Content-Length: {LIMIT}") + body)
        response = read_answer(sock)
    assert response.status == 404
    assert json.loads(response.read())["error"]["code"] == "model_not_found"


@requires_server
def test_chunked_body_that_keeps_going_is_cut_off_at_the_limit(small_gateway):
    chunk = b"x" * 8192
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with connect(small_gateway) as sock:
        sock.sendall(request_head("Transfer-Encoding: chunked"))
        # Four times the limit, and never the closing chunk: the gateway must answer anyway.
        for _ in range(4 * LIMIT // len(chunk)):
            send_what_the_server_takes(sock, framed)
        response = read_answer(sock)
        assert_too_large(response)
        # And it stops reading: the connection ends instead of waiting for more chunks.
        try:
            rest = sock.recv(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b""


def test_view_bounds_the_body_under_another_handler_too(client, settings):
    """Django's test client (WSGI) reads through the view's own bound."""
    settings.GATEWAY_MAX_BODY_BYTES = LIMIT
    response = client.post(
        "/v1/chat/completions", data=b" " * (LIMIT + 1), content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_large"
