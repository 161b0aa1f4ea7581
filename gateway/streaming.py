"""Server-sent events relayed one event at a time, blinded on the way (SPEC §8)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from experiments.models import RequestKind
from gateway.blinding import Blinder, dumps

#: Event types after which a well-formed stream is complete.
TERMINAL_EVENT_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "message_stop"}
)


class MalformedEvent(ValueError):
    """An upstream event whose data is not JSON."""


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split a byte stream into events (without their blank-line terminator).

    A trailing partial event (connection cut mid-event) is dropped: the caller
    notices the missing terminal event and ends the client's stream with an error.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[:end], buffer[end + 2 :]
            if event.strip():
                yield event


class EventRewriter:
    """Blinds each event, collects usage and notices the end of the stream."""

    def __init__(self, blinder: Blinder):
        self.blinder = blinder
        self.finished = False
        self.upstream_error = False

    def _data(self, payload: str) -> str:
        if payload.strip() == "[DONE]":
            self.finished = True
            return payload
        try:
            value: Any = json.loads(payload)
        except ValueError:
            raise MalformedEvent() from None
        self.blinder.rewrite(value)
        if isinstance(value, dict):
            if value.get("type") in TERMINAL_EVENT_TYPES:
                self.finished = True
            if value.get("type") == "error" or "error" in value and value.get("error"):
                self.upstream_error = True
        return dumps(value)

    def event(self, raw: bytes) -> bytes:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEvent() from None
        lines = []
        for line in text.split("\n"):
            if line.startswith("data:"):
                payload = line[5:]
                if payload.startswith(" "):
                    payload = payload[1:]
                line = "data: " + self._data(payload)
            elif line.startswith("event:") and line[6:].strip() == "error":
                self.upstream_error = True
            lines.append(line)
        return (self.blinder.scrub("\n".join(lines)) + "\n\n").encode("utf-8")


def error_event(kind: str, message: str, *, error_type: str, code: str) -> bytes:
    """The event that ends a client's stream after an upstream fault."""
    if kind == RequestKind.MESSAGES:
        payload = {"type": "error", "error": {"type": error_type, "message": message}}
        return f"event: error\ndata: {dumps(payload)}\n\n".encode()
    payload = {"error": {"message": message, "type": error_type, "code": code}}
    return f"data: {dumps(payload)}\n\n".encode()
