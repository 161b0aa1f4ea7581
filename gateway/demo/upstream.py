"""A local stand-in for a partner LLM API: an OpenAI- and Anthropic-compatible echo server.

Used by the demo, the tests and the benchmarks. It is a raw ASGI app (no framework, no
Django) so that it costs next to nothing next to the gateway it is measured against.

It behaves like a partner on purpose where the gateway must hide the partner: every response
carries partner headers (``server``, ``x-upstream-model``, ``x-request-id``,
``openai-organization``, ``x-upstream-host``), every ``model`` field echoes the model id the
gateway sent upstream, and error bodies name that model id and this server's host:port.

Request-body directives (top-level keys) drive faults and timing:

- ``demo_fault``: ``http_500`` | ``http_429`` | ``http_400`` | ``timeout`` (sleep
  ``demo_delay_ms``, default 30 s, then answer) | ``cut_stream`` (send a few bytes, then drop
  the connection) | ``malformed_json`` (200, ``application/json``, invalid body).
- ``demo_delay_ms``: delay before the first byte.
- ``demo_chunk_delay_ms``: pause between streamed chunks.
- ``demo_chunks``: number of content deltas in a stream (default 3).
- ``demo_finish``: how the answer ends, in each API's own words: ``stop`` (default) |
  ``length`` | ``tool_calls`` (the answer is one call of a ``lookup`` tool whose
  arguments carry the echo) | ``content_filter``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API_PREFIX = "/v1"
RECORD_PATH = "/__received"
DEMO_MODELS = ("demo-model-rc1", "demo-model-rc2")
FAULTS = frozenset({"http_500", "http_429", "http_400", "timeout", "cut_stream", "malformed_json"})
DEFAULT_TIMEOUT_FAULT_DELAY_MS = 30_000
DEFAULT_CHUNKS = 3
FINISHES = ("stop", "length", "tool_calls", "content_filter")
#: How each finish is said: chat ``finish_reason``, Anthropic ``stop_reason``, and
#: Responses (``status``, ``incomplete_details.reason``).
ANTHROPIC_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
RESPONSES_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
TOOL_NAME = "lookup"
# How many SSE events a cut stream sends before the connection is dropped.
CUT_STREAM_EVENTS = 2


class DemoStreamCut(Exception):
    """Raised inside the ASGI send loop so the server aborts the connection mid-response."""


class _DropDeliberateCuts(logging.Filter):
    # uvicorn logs every exception escaping the app with a traceback; a deliberate cut is not one.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DemoStreamCut)


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropDeliberateCuts) for f in logger.filters):
        logger.addFilter(_DropDeliberateCuts())


class DemoRequestError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> list[str]:
    """Every text string inside a message content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


def _conversation(path: str, body: dict[str, Any]) -> tuple[list[str], str]:
    """All prompt texts (for input token counts) and the last user text (to echo)."""
    texts: list[str] = []
    last_user = ""
    if path == "/responses":
        texts += _text_of(body.get("instructions"))
        items = body.get("input")
        if isinstance(items, str):
            return [*texts, items], items
        messages = items if isinstance(items, list) else []
    else:
        texts += _text_of(body.get("system"))
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    for message in messages:
        if not isinstance(message, dict):
            continue
        message_texts = _text_of(message.get("content"))
        texts += message_texts
        if message.get("role") == "user" and message_texts:
            last_user = " ".join(message_texts)
    return texts, last_user


def _pieces(text: str, count: int) -> list[str]:
    """Split ``text`` into exactly ``count`` non-empty consecutive slices."""
    size, extra = divmod(len(text), count)
    pieces, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


class EchoReply:
    """What one request is answered with: the same text and token counts in every shape."""

    def __init__(self, path: str, body: dict[str, Any], chunks: int) -> None:
        prompt_texts, last_user = _conversation(path, body)
        text = f"echo: {last_user}" if last_user else "echo:"
        if len(text) < chunks:
            # Every delta carries at least one character, so pad short replies.
            text += "." * (chunks - len(text))
        self.model: str = body["model"]
        self.text = text
        self.pieces = _pieces(text, chunks)
        self.input_tokens = sum(_words(t) for t in prompt_texts)
        self.output_tokens = _words(text)
        self.created = int(time.time())
        self.suffix = uuid.uuid4().hex[:24]
        self.finish: str = body.get("demo_finish") or "stop"

    @property
    def tool_arguments(self) -> str:
        """The arguments of the tool call a ``tool_calls`` answer makes (JSON text)."""
        return json.dumps({"query": self.text})

    @property
    def tool_pieces(self) -> list[str]:
        return _pieces(self.tool_arguments, len(self.pieces))


# --- OpenAI chat completions -------------------------------------------------------------


def _chat_usage(reply: EchoReply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.input_tokens + reply.output_tokens,
    }


def _chat_message(reply: EchoReply) -> dict[str, Any]:
    if reply.finish == "tool_calls":
        call = {
            "id": f"call_{reply.suffix}",
            "type": "function",
            "function": {"name": TOOL_NAME, "arguments": reply.tool_arguments},
        }
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    return {"role": "assistant", "content": reply.text, "refusal": None}


def chat_completion(reply: EchoReply) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{reply.suffix}",
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "fp_demo_upstream",
        "choices": [
            {
                "index": 0,
                "message": _chat_message(reply),
                "logprobs": None,
                "finish_reason": reply.finish,
            }
        ],
        "usage": _chat_usage(reply),
    }


def chat_completion_events(reply: EchoReply) -> Iterator[tuple[str | None, Any]]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{reply.suffix}",
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": "fp_demo_upstream",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    yield None, chunk({"role": "assistant", "content": ""})
    if reply.finish == "tool_calls":
        call = {"index": 0, "id": f"call_{reply.suffix}", "type": "function"}
        yield None, chunk({"tool_calls": [{**call, "function": {"name": TOOL_NAME}}]})
        for piece in reply.tool_pieces:
            yield None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    else:
        for piece in reply.pieces:
            yield None, chunk({"content": piece})
    yield None, chunk({}, reply.finish)
    # Usage always comes in a final chunk with no choices, as with stream_options.include_usage.
    usage_chunk = chunk({})
    usage_chunk["choices"] = []
    usage_chunk["usage"] = _chat_usage(reply)
    yield None, usage_chunk
    yield None, "[DONE]"


# --- OpenAI responses ----------------------------------------------------------------------


def _response_message(reply: EchoReply, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{reply.suffix}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
    }


def _response_tool_call(reply: EchoReply, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{reply.suffix}",
        "call_id": f"call_{reply.suffix}",
        "name": TOOL_NAME,
        "arguments": arguments,
        "status": status,
    }


def _response_output(reply: EchoReply, status: str) -> dict[str, Any]:
    if reply.finish == "tool_calls":
        return _response_tool_call(reply, reply.tool_arguments, "completed")
    return _response_message(reply, reply.text, status)


def response_object(reply: EchoReply, *, status: str | None = None) -> dict[str, Any]:
    """The response object; finished (as ``demo_finish`` says) unless ``status`` is given."""
    incomplete = RESPONSES_INCOMPLETE_REASONS.get(reply.finish)
    if status is None:
        status = "incomplete" if incomplete else "completed"
    done = status in ("completed", "incomplete")
    return {
        "id": f"resp_{reply.suffix}",
        "object": "response",
        "created_at": reply.created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": incomplete} if status == "incomplete" else None,
        "instructions": None,
        "max_output_tokens": None,
        "model": reply.model,
        "output": [_response_output(reply, status)] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "metadata": {},
        "usage": (
            {
                "input_tokens": reply.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": reply.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.input_tokens + reply.output_tokens,
            }
            if done
            else None
        ),
    }


def response_events(reply: EchoReply) -> Iterator[tuple[str | None, Any]]:
    sequence = 0

    def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        nonlocal sequence
        sequence += 1
        return kind, {"type": kind, "sequence_number": sequence - 1, **fields}

    yield event("response.created", response=response_object(reply, status="in_progress"))
    yield event("response.in_progress", response=response_object(reply, status="in_progress"))
    final = response_object(reply)
    if reply.finish == "tool_calls":
        position = {"output_index": 0, "item_id": f"fc_{reply.suffix}"}
        added = _response_tool_call(reply, "", "in_progress")
        yield event("response.output_item.added", output_index=0, item=added)
        for piece in reply.tool_pieces:
            yield event("response.function_call_arguments.delta", **position, delta=piece)
        arguments = reply.tool_arguments
        yield event("response.function_call_arguments.done", **position, arguments=arguments)
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.completed", response=final)
        return
    item_id = f"msg_{reply.suffix}"
    position = {"output_index": 0, "item_id": item_id}
    yield event(
        "response.output_item.added",
        output_index=0,
        item=_response_message(reply, "", "in_progress"),
    )
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", **position, content_index=0, part=empty_part)
    for piece in reply.pieces:
        yield event(
            "response.output_text.delta", **position, content_index=0, delta=piece, logprobs=[]
        )
    yield event(
        "response.output_text.done", **position, content_index=0, text=reply.text, logprobs=[]
    )
    full_part = {"type": "output_text", "text": reply.text, "annotations": []}
    yield event("response.content_part.done", **position, content_index=0, part=full_part)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    yield event(f"response.{final['status']}", response=final)


# --- Anthropic messages --------------------------------------------------------------------


def _anthropic_tool_use(reply: EchoReply, arguments: Any) -> dict[str, Any]:
    call_id = f"toolu_{reply.suffix}"
    return {"type": "tool_use", "id": call_id, "name": TOOL_NAME, "input": arguments}


def anthropic_message(reply: EchoReply) -> dict[str, Any]:
    if reply.finish == "tool_calls":
        content = [_anthropic_tool_use(reply, json.loads(reply.tool_arguments))]
    else:
        content = [{"type": "text", "text": reply.text}]
    return {
        "id": f"msg_{reply.suffix}",
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": ANTHROPIC_STOP_REASONS[reply.finish],
        "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
    }


def anthropic_message_events(reply: EchoReply) -> Iterator[tuple[str | None, Any]]:
    start = anthropic_message(reply)
    start.update(content=[], stop_reason=None)
    start["usage"] = {"input_tokens": reply.input_tokens, "output_tokens": 1}
    yield "message_start", {"type": "message_start", "message": start}
    tool = reply.finish == "tool_calls"
    block = _anthropic_tool_use(reply, {}) if tool else {"type": "text", "text": ""}
    yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
    yield "ping", {"type": "ping"}
    for piece in reply.tool_pieces if tool else reply.pieces:
        delta = (
            {"type": "input_json_delta", "partial_json": piece}
            if tool
            else {"type": "text_delta", "text": piece}
        )
        yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": ANTHROPIC_STOP_REASONS[reply.finish], "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


ROUTES = {
    "/chat/completions": (chat_completion, chat_completion_events),
    "/responses": (response_object, response_events),
    "/messages": (anthropic_message, anthropic_message_events),
}


def _sse(event: str | None, payload: Any) -> bytes:
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {body}\n\n".encode()


def _int_directive(body: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DemoRequestError(400, f"{key} must be an integer >= {minimum}", "invalid_request")
    return value


async def read_body(receive: Receive) -> bytes:
    """The whole request body of an ASGI HTTP request."""
    raw = bytearray()
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(raw)


class DemoUpstream:
    """The ASGI app. ``received`` records every API request, in order, for assertions."""

    def __init__(self, *, expected_api_key: str | None = None) -> None:
        self.expected_api_key = expected_api_key
        self.received: list[dict[str, Any]] = []
        # host:port this app is served on; known once the first request arrives.
        self.host = "127.0.0.1:0"
        _install_log_filter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        server = scope.get("server") or ("127.0.0.1", 0)
        self.host = f"{server[0]}:{server[1]}"

        if path == RECORD_PATH:
            await self._record_endpoint(method, send)
            return

        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.received.append({"method": method, "path": path, "headers": headers, "json": body})

        model = body.get("model") if isinstance(body, dict) else None
        try:
            self._check_auth(path, headers)
            if not path.startswith(API_PREFIX + "/"):
                raise DemoRequestError(404, f"no route {path} on {self.host}", "not_found")
            route = path[len(API_PREFIX) :]
            if route == "/models":
                if method != "GET":
                    raise DemoRequestError(405, "use GET", "method_not_allowed")
                await self._json(send, 200, self._models(), model=None)
                return
            if route not in ROUTES:
                raise DemoRequestError(404, f"no route {path} on {self.host}", "not_found")
            if method != "POST":
                raise DemoRequestError(405, "use POST", "method_not_allowed")
            if not raw or body is None:
                raise DemoRequestError(400, "request body is not valid JSON", "invalid_json")
            if not isinstance(body, dict) or not isinstance(model, str) or not model:
                raise DemoRequestError(400, "request body needs a string 'model'", "invalid_model")
            await self._answer(send, route, body)
        except DemoRequestError as error:
            await self._error(send, error, path=path, model=model)

    def _check_auth(self, path: str, headers: dict[str, str]) -> None:
        if self.expected_api_key is None:
            return
        accepted = headers.get("authorization") == f"Bearer {self.expected_api_key}"
        if path.endswith("/messages") and headers.get("x-api-key") == self.expected_api_key:
            accepted = True
        if not accepted:
            raise DemoRequestError(401, "Incorrect API key provided.", "invalid_api_key")

    async def _answer(self, send: Send, route: str, body: dict[str, Any]) -> None:
        fault = body.get("demo_fault")
        if fault is not None and fault not in FAULTS:
            raise DemoRequestError(400, f"unknown demo_fault {fault!r}", "invalid_demo_fault")
        finish = body.get("demo_finish", "stop")
        if finish not in FINISHES:
            raise DemoRequestError(
                400, f"demo_finish must be one of {', '.join(FINISHES)}", "invalid_demo_finish"
            )
        default_delay = DEFAULT_TIMEOUT_FAULT_DELAY_MS if fault == "timeout" else 0
        delay_ms = _int_directive(body, "demo_delay_ms", default_delay, 0)
        chunk_delay_ms = _int_directive(body, "demo_chunk_delay_ms", 0, 0)
        chunks = _int_directive(body, "demo_chunks", DEFAULT_CHUNKS, 1)
        model: str = body["model"]
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)

        if fault in ("http_500", "http_429", "http_400"):
            status = int(fault.removeprefix("http_"))
            message = {
                500: f"The server had an error processing model {model} at {self.host}.",
                429: f"Rate limit reached for model {model} on {self.host}.",
                400: f"Invalid request for model {model} at {self.host}.",
            }[status]
            code = {500: "server_error", 429: "rate_limit_exceeded", 400: "invalid_request"}
            raise DemoRequestError(status, message, code[status])
        if fault == "malformed_json":
            partial = f'{{"id": "chatcmpl-broken", "model": "{model}", "choices": [{{'
            await self._start(send, 200, "application/json", model)
            await send({"type": "http.response.body", "body": partial.encode()})
            return

        reply = EchoReply(route, body, chunks)
        complete, events = ROUTES[route]
        if not body.get("stream"):
            if fault == "cut_stream":
                await self._start(send, 200, "application/json", model)
                head = json.dumps(complete(reply)).encode()
                await send({"type": "http.response.body", "body": head[:20], "more_body": True})
                raise DemoStreamCut("demo_fault cut_stream")
            await self._json(send, 200, complete(reply), model=model)
            return

        await self._start(send, 200, "text/event-stream; charset=utf-8", model)
        for index, (event, payload) in enumerate(events(reply)):
            if fault == "cut_stream" and index == CUT_STREAM_EVENTS:
                raise DemoStreamCut("demo_fault cut_stream")
            if index and chunk_delay_ms:
                await asyncio.sleep(chunk_delay_ms / 1000)
            await send(
                {"type": "http.response.body", "body": _sse(event, payload), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})

    def _models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "partner-org"}
                for name in DEMO_MODELS
            ],
        }

    async def _record_endpoint(self, method: str, send: Send) -> None:
        if method == "GET":
            await self._json(send, 200, self.received, model=None)
        elif method == "DELETE":
            self.received.clear()
            await self._json(send, 200, {"cleared": True}, model=None)
        else:
            await self._error(
                send, DemoRequestError(405, "use GET or DELETE", "method_not_allowed"), "", None
            )

    def _partner_headers(self, model: str | None) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"server", b"demo-upstream"),
            (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
            (b"openai-organization", b"partner-org"),
            (b"openai-processing-ms", b"1"),
            (b"x-upstream-host", self.host.encode()),
            (b"cache-control", b"no-cache"),
        ]
        if model:
            headers.append((b"x-upstream-model", model.encode("latin-1", "replace")))
        return headers

    async def _start(
        self,
        send: Send,
        status: int,
        content_type: str,
        model: str | None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-type", content_type.encode()), *self._partner_headers(model)]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
        )

    async def _json(
        self,
        send: Send,
        status: int,
        payload: Any,
        *,
        model: str | None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = json.dumps(payload).encode()
        length = [(b"content-length", str(len(body)).encode())]
        await self._start(send, status, "application/json", model, length + (extra or []))
        await send({"type": "http.response.body", "body": body})

    async def _error(
        self, send: Send, error: DemoRequestError, path: str, model: str | None
    ) -> None:
        message = error.message
        if model and model not in message:
            message = f"{message} (model {model} at {self.host})"
        extra = [(b"retry-after", b"1")] if error.status == 429 else []
        if path.endswith("/messages") and error.status != 401:
            kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(
                error.status, "api_error"
            )
            payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            kind = {
                401: "invalid_request_error",
                429: "rate_limit_exceeded",
                500: "server_error",
            }.get(error.status, "invalid_request_error")
            payload = {
                "error": {"message": message, "type": kind, "param": None, "code": error.code}
            }
        await self._json(send, error.status, payload, model=model, extra=extra)


def make_app(*, expected_api_key: str | None = None) -> DemoUpstream:
    return DemoUpstream(expected_api_key=expected_api_key)
