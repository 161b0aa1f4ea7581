"""Pytest plugin (``-p tests.hostile_upstream``): a careless partner upstream on loopback.

It speaks the demo upstream's shapes (OpenAI chat completions, Anthropic messages) but
misbehaves on request, by the ``hostile`` directive in the request body:

- ``echo`` (default): a completion echoing the last user message, streamed when asked
  in deltas of ``piece`` characters (default 3).
- ``key_in_error``: an error (``status``, default 401) whose message, ``param`` and
  headers (``retry-after``, ``x-echo-key``, ``www-authenticate``) echo the credential it
  received, with a ``Set-Cookie`` too.
- ``key_in_completion``: a 200 whose content holds that credential twice, verbatim and
  JSON-escaped (``\\u0073k-…``: the raw bytes never hold the key), and an ``x-echo-key``
  header.
- ``key_in_stream``: a stream whose text deltas carry ``Your key is <key>.`` cut into
  pieces of ``piece`` characters (default 3), so the key is split across events.
- ``deployment_error``: a 500 naming this server's deployment path segment, the model id
  it was sent, its host:port and the full URL, in the message and in ``param``.
- ``set_cookie``: an echo completion that sets a session cookie.
- ``retry_after``: a 429 with ``retry-after`` set to the body's ``retry_after``.
- ``huge_event``: a stream with one content delta of ``size`` bytes, written in
  ``write`` -byte pieces (default 64 KiB), then the usual end.

Every request is recorded (path, headers including ``cookie``, JSON body).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.demo_upstream import ROUTES, EchoReply, _sse, read_body
from tests.upstream import RunningUpstream

COOKIE_NAME = "partner_session"


def received_key(headers: dict[str, str]) -> str:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:]
    return headers.get("x-api-key", "")


def json_escaped(text: str) -> str:
    """``text`` as a JSON string body where every character is a \\u escape."""
    return "".join(f"\\u{ord(char):04x}" for char in text)


class HostileUpstream:
    """The ASGI app; ``received`` records every request, in order."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.cookies_set = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = json.loads(raw) if raw else {}
        self.received.append({"path": scope["path"], "headers": headers, "json": body})
        server = scope.get("server") or ("127.0.0.1", 0)
        exchange = _Exchange(self, send, scope["path"], headers, body, f"{server[0]}:{server[1]}")
        await exchange.answer()


class _Exchange:
    def __init__(self, app, send, path: str, headers: dict[str, str], body: dict, host: str):
        self.app = app
        self.send = send
        self.path = path
        self.body = body
        self.host = host
        self.key = received_key(headers)
        self.route = next((r for r in ROUTES if path.endswith(r)), "/chat/completions")
        self.model = str(body.get("model", ""))

    @property
    def deployment(self) -> str:
        segments = [s for s in self.path.split("/") if s]
        return segments[1] if segments[:1] == ["deployments"] else ""

    async def answer(self) -> None:
        behaviour = self.body.get("hostile", "echo")
        await getattr(self, behaviour)()

    # --- building blocks ---------------------------------------------------------------

    async def _start(self, status: int, content_type: str, headers=()) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode()), *headers],
            }
        )

    async def _json(self, status: int, raw: bytes, headers=()) -> None:
        await self._start(status, "application/json", headers)
        await self.send({"type": "http.response.body", "body": raw})

    def _reply(self, text: str | None = None, piece: int = 3) -> EchoReply:
        reply = EchoReply(self.route, {**self.body, "model": self.model}, 1)
        if text is not None:
            reply.text = text
        reply.pieces = [reply.text[i : i + piece] for i in range(0, len(reply.text), piece)]
        return reply

    def _events(self, reply: EchoReply) -> Iterator[bytes]:
        for event, payload in ROUTES[self.route][1](reply):
            yield _sse(event, payload)

    async def _stream(self, reply: EchoReply) -> None:
        await self._start(200, "text/event-stream")
        for event in self._events(reply):
            await self.send({"type": "http.response.body", "body": event, "more_body": True})
        await self.send({"type": "http.response.body", "body": b""})

    async def _completion(self, reply: EchoReply, headers=()) -> None:
        if self.body.get("stream"):
            await self._stream(reply)
            return
        raw = json.dumps(ROUTES[self.route][0](reply)).encode()
        await self._json(200, raw, headers)

    # --- behaviours ----------------------------------------------------------------------

    async def echo(self) -> None:
        await self._completion(self._reply(piece=int(self.body.get("piece", 3))))

    async def key_in_error(self) -> None:
        key = self.key
        payload = {
            "error": {
                "message": f"Incorrect API key provided: {key}. You sent {key}.",
                "type": "invalid_request_error",
                "param": key,
                "code": "invalid_api_key",
                "key_used": key,
            }
        }
        headers = [
            (b"retry-after", key.encode()),
            (b"x-echo-key", key.encode()),
            (b"www-authenticate", f'Bearer realm="{key}"'.encode()),
            (b"set-cookie", f"{COOKIE_NAME}={key}; Path=/".encode()),
        ]
        await self._json(int(self.body.get("status", 401)), json.dumps(payload).encode(), headers)

    async def key_in_completion(self) -> None:
        reply = self._reply("verbatim KEY_HERE escaped ESCAPED_HERE")
        raw = json.dumps(ROUTES[self.route][0](reply))
        raw = raw.replace("KEY_HERE", self.key).replace("ESCAPED_HERE", json_escaped(self.key))
        await self._json(200, raw.encode(), [(b"x-echo-key", self.key.encode())])

    async def key_in_stream(self) -> None:
        reply = self._reply(f"Your key is {self.key}.", piece=int(self.body.get("piece", 3)))
        await self._stream(reply)

    async def deployment_error(self) -> None:
        where = f"http://{self.host}{self.path}"
        message = (
            f"Deployment {self.deployment} failed serving model {self.model} "
            f"on {self.host} ({where})"
        )
        payload = {
            "error": {
                "message": message,
                "type": "server_error",
                "param": self.deployment,
                "code": None,
                "deployment": self.deployment,
            }
        }
        await self._json(500, json.dumps(payload).encode())

    async def set_cookie(self) -> None:
        self.app.cookies_set += 1
        value = f"{COOKIE_NAME}=user-{self.app.cookies_set}; Path=/; Max-Age=3600"
        await self._completion(self._reply(), [(b"set-cookie", value.encode())])

    async def retry_after(self) -> None:
        payload = {"error": {"message": "slow down", "type": "rate_limit", "code": None}}
        headers = [(b"retry-after", str(self.body["retry_after"]).encode())]
        await self._json(429, json.dumps(payload).encode(), headers)

    async def huge_event(self) -> None:
        size, write = int(self.body["size"]), int(self.body.get("write", 64 * 1024))
        events = list(self._events(self._reply("x" * size, piece=size)))
        await self._start(200, "text/event-stream")
        for event in events:
            for start in range(0, len(event), write):
                chunk = event[start : start + write]
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        await self.send({"type": "http.response.body", "body": b""})


class HostileHandle:
    """What a test sees: where the partner listens and what it received."""

    def __init__(self, running: RunningUpstream) -> None:
        self._running = running
        self.host_port = f"127.0.0.1:{running.port}"

    def base_url(self, deployment: str) -> str:
        return f"http://{self.host_port}/deployments/{deployment}/v1"

    @property
    def received(self) -> list[dict[str, Any]]:
        return self._running.app.received


def _serve() -> Iterator[RunningUpstream]:
    running = RunningUpstream(HostileUpstream())
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def _hostile_server() -> Iterator[RunningUpstream]:
    yield from _serve()


@pytest.fixture(scope="session")
def _second_hostile_server() -> Iterator[RunningUpstream]:
    yield from _serve()


@pytest.fixture
def hostile_upstream(_hostile_server: RunningUpstream) -> HostileHandle:
    """A careless partner, with an empty request record."""
    _hostile_server.app.received.clear()
    return HostileHandle(_hostile_server)


@pytest.fixture
def second_hostile_upstream(_second_hostile_server: RunningUpstream) -> HostileHandle:
    """Another careless partner on another port (a second slot's host)."""
    _second_hostile_server.app.received.clear()
    return HostileHandle(_second_hostile_server)
