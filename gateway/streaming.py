"""Server-sent events relayed one event at a time, blinded on the way (SPEC §8)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from experiments.models import RequestKind
from gateway.blinding import REDACTED, Blinder, dumps

#: Event types after which a well-formed stream is complete.
TERMINAL_EVENT_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "message_stop"}
)
#: How many events may wait behind one that ends with the start of the partner key
#: before it is let go anyway (see ``SplitKeyGuard``).
MAX_HELD_EVENTS = 64
#: Shortest start of the key that holds an event back (see ``SplitKeyGuard``).
MIN_HELD = 3
#: Fields whose strings are protocol words, never generated text: a key split across
#: events is not looked for in them (they are still scrubbed of a whole key).
PROTOCOL_FIELDS = frozenset(
    {"type", "object", "id", "model", "role", "finish_reason", "stop_reason", "status"}
)

#: Fields that say which of several interleaved streams an event continues.
INDEX_FIELDS = ("index", "output_index", "content_index")


class MalformedEvent(ValueError):
    """An upstream event whose data is not JSON, or that is larger than allowed."""


class _EventSplitter:
    """Cuts a byte stream into SSE events in time linear in its length.

    Bytes go into one buffer, line endings are normalised per chunk, and each search
    for an event's end starts where the previous one stopped (appending to ``bytes`` and
    searching from 0 each chunk was quadratic: one 32 MB event stalled a worker 440 ms).
    """

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self.buffer = bytearray()
        self.scanned = 0  # buffer[:scanned] holds no event terminator
        self.carried_cr = False  # the last chunk ended in CR: maybe half of a CRLF

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.carried_cr:
            chunk = b"\r" + chunk
            self.carried_cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self.carried_cr = chunk[:-1], True
            # CRLF, CR and LF all end a line (SSE); only LF is looked for below.
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self.buffer
        buffer += chunk
        events = []
        start = 0
        while (end := buffer.find(b"\n\n", max(self.scanned - 1, start))) >= 0:
            if end - start > self.max_event_bytes:
                raise MalformedEvent()
            event = bytes(buffer[start:end])
            start = self.scanned = end + 2
            if event.strip():
                events.append(event)
        del buffer[:start]
        self.scanned = len(buffer)
        if self.scanned > self.max_event_bytes:
            raise MalformedEvent()
        return events

    def end(self) -> list[bytes]:
        """Events completed by a CR that ended the stream."""
        return self.feed(b"\n") if self.carried_cr else []


async def sse_events(chunks: AsyncIterator[bytes], *, max_event_bytes: int) -> AsyncIterator[bytes]:
    """Split a byte stream into events (without their blank-line terminator).

    An event growing past ``max_event_bytes`` raises MalformedEvent instead of being
    buffered further. A trailing partial event (connection cut mid-event) is dropped:
    the caller notices the missing terminal event and ends the client's stream with an
    error.
    """
    splitter = _EventSplitter(max_event_bytes)
    async for chunk in chunks:
        for event in splitter.feed(chunk):
            yield event
    for event in splitter.end():
        yield event


@contextmanager
def _too_deep_is_malformed() -> Iterator[None]:
    try:
        yield
    except RecursionError:
        raise MalformedEvent() from None


class _Event:
    """One upstream event, parsed, waiting to be serialized for the client."""

    __slots__ = ("lines",)

    def __init__(self, lines: list[str | list[Any]]) -> None:
        #: Text lines verbatim; a data line as ``[value]`` (a one-item list, edited in place).
        self.lines = lines

    def serialize(self, blinder: Blinder) -> bytes:
        out = []
        for line in self.lines:
            if isinstance(line, list):
                out.append("data: " + blinder.scrubber.dumps(line[0]))
            else:
                out.append(blinder.scrubber.text(line))
        return ("\n".join(out) + "\n\n").encode("utf-8")


class _Piece:
    """The end of one string (from ``start``) that may be the beginning of the key."""

    __slots__ = ("container", "slot", "start", "event")

    def __init__(self, container: Any, slot: Any, start: int, event: _Event) -> None:
        self.container = container
        self.slot = slot
        self.start = start
        self.event = event

    @property
    def text(self) -> str:
        return self.container[self.slot][self.start :]


def _held_length(text: str, key: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``key``."""
    index = text.find(key[0], max(0, len(text) - len(key) + 1))
    while index >= 0:
        if key.startswith(text[index:]):
            return len(text) - index
        index = text.find(key[0], index + 1)
    return 0


class SplitKeyGuard:
    """Keeps a partner key split across events (``"sk-ca"`` + ``"nary…"``) from the client.

    Why hold back rather than scrub the concatenation afterwards: by the time the second
    half arrives the first is already with the client, so scrubbing later would leak all
    but the last piece of the key. Instead, an event whose string (at one JSON path:
    ``choices/[0]/delta/content``, ``delta/text``…) ends with the key's first
    ``MIN_HELD`` characters or more is held, with every event after it, until the next
    string at that path settles it: the key completed (its parts, in every held event,
    are cut out and ``REDACTED`` put where it began) or not (the events go out as they
    were). Content never moves between events, so a stream without the key is relayed
    byte for byte, at worst one event late. Shorter beginnings go out at once (holding
    every delta that ends in "s" would delay many) and are remembered, so the rest of the
    key is still cut: at most the key's first ``MIN_HELD - 1`` characters can reach the
    client. Bound: at most ``MAX_HELD_EVENTS`` wait; past that (and at the end of the
    stream) the oldest goes out as it is, and what follows of the key is still cut.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        #: JSON path of a string → the held pieces (oldest first) continuing a key's start.
        self.runs: dict[tuple[Any, ...], list[_Piece]] = {}
        #: JSON path → the start of the key that ended the strings there and already went out.
        self.sent: dict[tuple[Any, ...], str] = {}

    def track(self, event: _Event) -> None:
        for line_index, line in enumerate(event.lines):
            if isinstance(line, list):
                self._walk(line, (line_index,), event)

    def _walk(self, container: dict | list, path: tuple[Any, ...], event: _Event) -> None:
        # Runs on every event of every stream: plain type checks, no per-string allocation
        # unless a string holds (the start of) the key or may continue one.
        key, pending = self.key, self.runs or self.sent
        if type(container) is dict:
            # Interleaved streams (choices, content blocks, output items) say which one an
            # event continues by an index field, not by a position.
            place = tuple(container.get(name) for name in INDEX_FIELDS)
            items: Any = container.items()
        else:
            place = None
            items = enumerate(container)
        for name, item in items:
            kind = type(item)
            if kind is str:
                if name in PROTOCOL_FIELDS:
                    continue
                if pending or key in item or _held_length(item, key):
                    self._string(container, name, (*path, place, name), event)
            elif kind is dict or kind is list:
                self._walk(item, (*path, place, name), event)

    def _string(self, container: Any, slot: Any, path: tuple[Any, ...], event: _Event) -> None:
        key = self.key
        sent = self.sent.pop(path, "")
        pieces = [*self.runs.pop(path, ()), _Piece(container, slot, 0, event)]
        texts = [piece.text for piece in pieces]
        joined = sent + "".join(texts)
        found = []
        position = joined.find(key)
        while position >= 0:
            found.append(position)
            position = joined.find(key, position + len(key))
        tail_from = found[-1] + len(key) if found else 0
        hold_from = len(joined) - _held_length(joined[tail_from:], key)
        hold = len(joined) - hold_from >= MIN_HELD
        offset = len(sent)
        kept: list[_Piece] = []
        for piece, piece_text in zip(pieces, texts, strict=True):
            end = offset + len(piece_text)
            edited = _cut(joined, offset, end, found, len(key), editable_from=len(sent))
            if found:
                whole = piece.container[piece.slot]
                piece.container[piece.slot] = whole[: piece.start] + edited
            if hold and end > hold_from:
                # Nothing after hold_from was edited, so count back from the string's end.
                start = piece.start + len(edited) - (end - max(offset, hold_from))
                kept.append(_Piece(piece.container, piece.slot, start, piece.event))
            offset = end
        if kept:
            self.runs[path] = kept
        gone = joined[hold_from : len(sent)] if hold else joined[hold_from:]
        if gone:
            self.sent[path] = gone

    def holds(self) -> set[int]:
        return {id(piece.event) for run in self.runs.values() for piece in run}

    def let_go(self, event: _Event) -> None:
        """Send ``event`` as it is: runs with a piece in it count as gone to the client."""
        for path, run in list(self.runs.items()):
            if any(piece.event is event for piece in run):
                del self.runs[path]
                self.sent[path] = self.sent.get(path, "") + "".join(p.text for p in run)

    def clear(self) -> None:
        self.runs.clear()
        self.sent.clear()


def _cut(
    joined: str, start: int, end: int, found: list[int], key_length: int, *, editable_from: int
) -> str:
    """``joined[start:end]`` without the found keys, ``REDACTED`` where each began (or
    where the editable text begins, when its start already went out)."""
    out = []
    position = start
    for begin in found:
        finish = begin + key_length
        if finish <= start or begin >= end:
            continue
        if begin > position:
            out.append(joined[position:begin])
        if start <= max(begin, editable_from) < end:
            out.append(REDACTED)
        position = max(position, min(finish, end))
    out.append(joined[position:end])
    return "".join(out)


class EventRewriter:
    """Blinds each event, collects usage, notices the end of the stream, and keeps the
    partner key out of the relayed bytes, also when split across events."""

    def __init__(self, blinder: Blinder):
        self.blinder = blinder
        self.finished = False
        self.upstream_error = False
        key = blinder.scrubber.key
        self._guard = SplitKeyGuard(key) if key else None
        self._held: deque[_Event] = deque()

    def _data(self, payload: str) -> str | list[Any]:
        if payload.strip() == "[DONE]":
            self.finished = True
            return "data: " + payload
        try:
            value: Any = json.loads(payload)
        except (ValueError, RecursionError):
            raise MalformedEvent() from None
        self.blinder.rewrite(value)
        if isinstance(value, dict):
            if value.get("type") in TERMINAL_EVENT_TYPES:
                self.finished = True
            if value.get("type") == "error" or "error" in value and value.get("error"):
                self.upstream_error = True
        return [value]

    def _parse(self, raw: bytes) -> _Event:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEvent() from None
        lines: list[str | list[Any]] = []
        for line in text.split("\n"):
            if line.startswith("data:"):
                payload = line[5:]
                if payload.startswith(" "):
                    payload = payload[1:]
                lines.append(self._data(payload))
                continue
            if line.startswith("event:") and line[6:].strip() == "error":
                self.upstream_error = True
            lines.append(line)
        return _Event(lines)

    def event(self, raw: bytes) -> bytes:
        """Take one upstream event; return the bytes now due to the client (maybe none)."""
        event = self._parse(raw)
        # Walking and serializing recurse as deep as the partner nested its JSON.
        with _too_deep_is_malformed():
            if self._guard is None:
                return event.serialize(self.blinder)
            self._held.append(event)
            self._guard.track(event)
            return self._release()

    def flush(self) -> bytes:
        """Everything still held, at the end of the stream."""
        if self._guard is not None:
            self._guard.clear()
        with _too_deep_is_malformed():
            return self._release()

    def _release(self) -> bytes:
        if self._guard is None:
            return b""
        out = []
        while len(self._held) > MAX_HELD_EVENTS:
            self._guard.let_go(self._held[0])
            out.append(self._held.popleft().serialize(self.blinder))
        held = self._guard.holds()
        while self._held and id(self._held[0]) not in held:
            out.append(self._held.popleft().serialize(self.blinder))
        return b"".join(out)


def error_event(kind: str, message: str, *, error_type: str, code: str) -> bytes:
    """The event that ends a client's stream after an upstream fault."""
    payload: dict[str, Any]
    if kind == RequestKind.MESSAGES:
        payload = {"type": "error", "error": {"type": error_type, "message": message}}
        return f"event: error\ndata: {dumps(payload)}\n\n".encode()
    payload = {"error": {"message": message, "type": error_type, "code": code}}
    return f"data: {dumps(payload)}\n\n".encode()
