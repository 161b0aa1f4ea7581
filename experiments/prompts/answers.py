"""Captured answers (SPEC §9): what a checkpoint answered to a sampled request.

Opt-in per experiment (``Experiment.response_capture_rate``). Which requests are
sampled is decided by a hash of the usage id (``is_sampled``), so the choice is
reproducible from the row alone.

The gateway does as little as prompt capture does on the request path: it keeps a
reference to the bytes it relayed to the client (the blinded JSON body, or the blinded
SSE events up to ``MAX_COLLECTED_STREAM_BYTES``) in a ``CapturedAnswer``. The usage
writer's thread, off the request path, assembles the answer from them
(``answer_document``) and stores it content-addressed in the prompt store's answer
namespace (``capture_answer``). Because the bytes are those the client received, the
answer has been through the same blinding and key scrubbing as the relayed response
(a key split across stream events included); the assembled text is scrubbed once more.

The stored document is canonical JSON::

    {"text": "...", "tool_calls": [{"name": "...", "arguments": "..."}], "truncated": false}

``text`` is the assembled text of the answer (chat completions: the first choice's
content; Responses: the output text; Anthropic Messages: the text blocks; in streams the
deltas joined), distinct text blocks separated by a blank line. ``tool_calls`` are the
tool or function calls with their arguments as the model wrote them (Anthropic
``tool_use`` input as compact JSON). Past ``MAX_ANSWER_BYTES`` (UTF-8) the text, then the
arguments, are cut at a code point and ``truncated`` is true; it is also true when a
stream outgrew what the gateway collects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from experiments.models import PROMPT_HASH_FAILED, RequestKind
from experiments.prompts.store import PromptStore, get_prompt_store, truncate_utf8

logger = logging.getLogger(__name__)

#: The stored answer (text and tool arguments, UTF-8) is cut past this.
MAX_ANSWER_BYTES = 1024 * 1024
#: A sampled stream's relayed bytes are kept up to this much (memory per stream).
MAX_COLLECTED_STREAM_BYTES = 4 * 1024 * 1024
#: Rates are in hundredths of a percent.
FULL_RATE = 10_000
BLOCK_SEPARATOR = "\n\n"


def is_sampled(usage_id: uuid.UUID, basis_points: int) -> bool:
    """Whether the answer of request ``usage_id`` is captured at ``basis_points``/10000.

    The first 8 bytes of SHA-256 of the id's 16 bytes, as an integer, modulo 10000:
    the same id is always sampled the same way, and ids spread evenly.
    """
    if basis_points <= 0:
        return False
    if basis_points >= FULL_RATE:
        return True
    digest = hashlib.sha256(usage_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") % FULL_RATE < basis_points


@dataclass
class CapturedAnswer:
    """What the gateway relayed for a sampled request, kept for the writer thread."""

    kind: str
    #: Removes the partner key from a string (process memory only; never spooled).
    scrub: Callable[[str], str] | None = None
    #: A non-streamed answer: the JSON body relayed to the client.
    body: bytes | None = None
    #: A streamed answer: the SSE bytes relayed to the client, in order.
    chunks: list[bytes] = field(default_factory=list)
    collected: int = 0
    #: The stream outgrew MAX_COLLECTED_STREAM_BYTES: what followed was not kept.
    cut: bool = False

    def add(self, chunk: bytes) -> None:
        """Keep one relayed chunk (whole SSE events), unless over the bound."""
        if self.cut:
            return
        if self.collected + len(chunk) > MAX_COLLECTED_STREAM_BYTES:
            self.cut = True
            return
        self.chunks.append(chunk)
        self.collected += len(chunk)


# --- assembling -----------------------------------------------------------------------


class _Assembly:
    """Text blocks and tool calls by position, in the order the answer gives them."""

    def __init__(self) -> None:
        self.texts: dict[Any, list[str]] = {}
        self.tools: dict[Any, dict[str, list[str]]] = {}

    def text(self, where: Any, piece: Any) -> None:
        if isinstance(piece, str) and piece:
            self.texts.setdefault(where, []).append(piece)

    def set_text(self, where: Any, text: Any) -> None:
        """A final text for ``where``, used only when no delta gave one."""
        if isinstance(text, str) and text and where not in self.texts:
            self.texts[where] = [text]

    def tool(self, where: Any, *, name: Any = None, arguments: Any = None) -> None:
        call = self.tools.setdefault(where, {"name": [], "arguments": []})
        if isinstance(name, str) and name:
            call["name"].append(name)
        if isinstance(arguments, str) and arguments:
            call["arguments"].append(arguments)

    def set_arguments(self, where: Any, arguments: Any) -> None:
        call = self.tools.get(where)
        if call is not None and isinstance(arguments, str) and not call["arguments"]:
            call["arguments"].append(arguments)

    def result(self) -> tuple[str, list[dict[str, str]]]:
        text = BLOCK_SEPARATOR.join("".join(self.texts[k]) for k in _ordered(self.texts))
        tools = [
            {
                "name": "".join(self.tools[k]["name"]),
                "arguments": "".join(self.tools[k]["arguments"]),
            }
            for k in _ordered(self.tools)
        ]
        return text, tools


def _ordered(mapping: dict[Any, Any]) -> list[Any]:
    def key(where: Any) -> tuple:
        parts = where if isinstance(where, tuple) else (where,)
        return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in parts)

    return sorted(mapping, key=key)


def _int(value: Any, default: int = 0) -> int:
    return value if type(value) is int else default


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


# Non-streamed bodies.


def _chat_body(body: dict[str, Any], out: _Assembly) -> None:
    choices = body.get("choices")
    if not isinstance(choices, list):
        return
    first = next((c for c in choices if isinstance(c, dict) and _int(c.get("index")) == 0), None)
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        return
    for index, text in enumerate(_content_texts(message.get("content"))):
        out.text(("content", index), text)
    calls = message.get("tool_calls")
    for index, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            out.tool(index, name=function.get("name"), arguments=function.get("arguments"))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        out.tool("function_call", name=legacy.get("name"), arguments=legacy.get("arguments"))


def _responses_output(output: Any, out: _Assembly) -> None:
    for position, item in enumerate(output if isinstance(output, list) else []):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            content = item.get("content")
            for index, part in enumerate(content if isinstance(content, list) else []):
                if isinstance(part, dict) and part.get("type") == "output_text":
                    out.text((position, index), part.get("text"))
        elif item.get("type") == "function_call":
            out.tool(position, name=item.get("name"), arguments=item.get("arguments"))


def _messages_content(content: Any, out: _Assembly) -> None:
    for index, block in enumerate(content if isinstance(content, list) else []):
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            out.text(index, block.get("text"))
        elif block.get("type") == "tool_use":
            arguments = json.dumps(
                block.get("input", {}), ensure_ascii=False, separators=(",", ":")
            )
            out.tool(index, name=block.get("name"), arguments=arguments)


# Streamed events.


def _chat_event(event: dict[str, Any], out: _Assembly) -> None:
    choices = event.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict) or _int(choice.get("index")) != 0:
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        out.text(("content", 0), delta.get("content"))
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else []):
            if not isinstance(call, dict):
                continue
            function = call.get("function")
            if isinstance(function, dict):
                out.tool(
                    _int(call.get("index"), position),
                    name=function.get("name"),
                    arguments=function.get("arguments"),
                )
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            out.tool("function_call", name=legacy.get("name"), arguments=legacy.get("arguments"))


def _responses_event(event: dict[str, Any], out: _Assembly) -> None:
    kind = event.get("type")
    position = _int(event.get("output_index"))
    where = (position, _int(event.get("content_index")))
    if kind == "response.output_text.delta":
        out.text(where, event.get("delta"))
    elif kind == "response.output_text.done":
        out.set_text(where, event.get("text"))
    elif kind == "response.output_item.added":
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call":
            out.tool(position, name=item.get("name"), arguments=item.get("arguments"))
    elif kind == "response.function_call_arguments.delta":
        out.tool(position, arguments=event.get("delta"))
    elif kind == "response.function_call_arguments.done":
        out.set_arguments(position, event.get("arguments"))


def _messages_event(event: dict[str, Any], out: _Assembly) -> None:
    kind = event.get("type")
    index = _int(event.get("index"))
    if kind == "content_block_start":
        block = event.get("content_block")
        if isinstance(block, dict) and block.get("type") == "text":
            out.text(index, block.get("text"))
        elif isinstance(block, dict) and block.get("type") == "tool_use":
            out.tool(index, name=block.get("name"))
    elif kind == "content_block_delta":
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return
        if delta.get("type") == "text_delta":
            out.text(index, delta.get("text"))
        elif delta.get("type") == "input_json_delta":
            out.tool(index, arguments=delta.get("partial_json"))


BODY_READERS = {
    RequestKind.CHAT_COMPLETIONS: _chat_body,
    RequestKind.RESPONSES: lambda body, out: _responses_output(body.get("output"), out),
    RequestKind.MESSAGES: lambda body, out: _messages_content(body.get("content"), out),
}
EVENT_READERS = {
    RequestKind.CHAT_COMPLETIONS: _chat_event,
    RequestKind.RESPONSES: _responses_event,
    RequestKind.MESSAGES: _messages_event,
}


def sse_payloads(chunks: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    """The JSON objects of the ``data:`` lines of relayed SSE bytes (``[DONE]`` skipped)."""
    for event in b"".join(chunks).split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                value = json.loads(line[5:])
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                yield value


def answer_document(captured: CapturedAnswer) -> dict[str, Any]:
    """The answer assembled from what was relayed, scrubbed and bounded."""
    out = _Assembly()
    if captured.body is not None:
        try:
            body = json.loads(captured.body)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict):
            BODY_READERS[captured.kind](body, out)
    else:
        reader = EVENT_READERS[captured.kind]
        for event in sse_payloads(captured.chunks):
            reader(event, out)
    text, tools = out.result()
    scrub = captured.scrub or (lambda value: value)
    budget = MAX_ANSWER_BYTES
    encoded, truncated = truncate_utf8(scrub(text).encode("utf-8"), budget)
    budget -= len(encoded)
    calls = []
    for call in tools:
        arguments, cut = truncate_utf8(scrub(call["arguments"]).encode("utf-8"), budget)
        budget -= len(arguments)
        truncated = truncated or cut
        calls.append(
            {
                "name": scrub(call["name"])[:256],
                "arguments": arguments.decode("utf-8"),
            }
        )
    return {
        "text": encoded.decode("utf-8"),
        "tool_calls": calls,
        "truncated": truncated or captured.cut,
    }


def canonical_answer(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(
        "utf-8"
    )


def capture_answer(captured: CapturedAnswer, *, store: PromptStore | None = None) -> str:
    """Assemble and store an answer; return its sha256, or ``__failed__``. Never raises."""
    try:
        canonical = canonical_answer(answer_document(captured))
        return (store or get_prompt_store()).put_answer(canonical)
    except Exception as exc:
        logger.warning("answer capture failed: %s", type(exc).__name__)
        return PROMPT_HASH_FAILED


def read_answer(sha256: str, *, store: PromptStore | None = None) -> dict[str, Any]:
    """A stored answer document; KeyError when absent or not matching its hash."""
    raw = (store or get_prompt_store()).get_answer(sha256)
    try:
        document = json.loads(raw)
    except ValueError:
        raise KeyError(f"{sha256} (not an answer document)") from None
    if not isinstance(document, dict):
        raise KeyError(f"{sha256} (not an answer document)")
    return document
