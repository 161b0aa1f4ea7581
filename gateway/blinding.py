"""Client blinding and secret hygiene (SPEC §6, §8): the client never learns which
checkpoint served it, and never sees the partner key, whatever the partner sends back.

Blinding is structural: ``model`` fields are rewritten (top level, Anthropic
``message.model``, Responses ``response.model``) and generated content stays byte for
byte what the checkpoint produced. Text substitution over whole bodies would itself be a
signal (a prompt naming two candidate ids would see which one came back rewritten).
Upstream error bodies are rebuilt with ``message``, ``type`` and ``code`` only, and in
them every identifier that tells the experiment's checkpoints apart is replaced for all
of them at once. The partner key the gateway sent is removed from every string relayed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.utils.http import http_date, parse_http_date

from experiments.models import RequestKind
from experiments.quality import (
    ANTHROPIC_FINISH,
    CHAT_FINISH,
    OTHER,
    STOP,
    TOOL_CALLS,
    responses_finish,
)

if TYPE_CHECKING:
    from gateway.routing import Route

#: What a partner key echoed by the partner becomes.
REDACTED = "[redacted]"
#: What an upstream host, base URL or distinguishing path segment becomes in error text.
NEUTRAL_LOCATION = "upstream"
#: Characters ``json.dumps(ensure_ascii=False)`` writes as escapes.
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')
#: Response fields that fingerprint the serving backend and so could tell variants apart.
FINGERPRINT_FIELDS = ("system_fingerprint",)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0

    def absorb(self, usage: Any) -> None:
        """Take counts from an OpenAI, Responses or Anthropic usage object (latest wins)."""
        if not isinstance(usage, dict):
            return
        for source, target in (
            ("prompt_tokens", "input_tokens"),
            ("input_tokens", "input_tokens"),
            ("completion_tokens", "output_tokens"),
            ("output_tokens", "output_tokens"),
        ):
            value = usage.get(source)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(self, target, value)


#: Responses stream events that carry the finished response.
RESPONSES_TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


class FinishReason:
    """Why the answer ended (experiments.quality.FINISH_REASONS), from a body or from the
    events of a stream (latest wins). This base reads nothing; ``for_kind`` gives the
    reader of one API shape.

    Reads only top-level fields of values the relay has parsed anyway (usage is taken from
    the same values): a few dictionary lookups per event, nothing parsed twice. One class
    per shape rather than a bound method kept on the instance: that would be a reference
    cycle per request, garbage only the cycle collector frees (tests/test_gateway_garbage).
    """

    __slots__ = ("reason", "tool_calls")

    def __init__(self) -> None:
        self.reason: str | None = None
        #: A chat answer carried tool calls (some servers then still say "stop").
        self.tool_calls = False

    @staticmethod
    def for_kind(kind: str | None) -> FinishReason:
        return _FINISH_READERS.get(kind, FinishReason)()

    @property
    def normalised(self) -> str | None:
        if self.reason == STOP and self.tool_calls:
            return TOOL_CALLS
        return self.reason

    def absorb(self, value: dict[str, Any]) -> None:
        return None


class _ChatFinish(FinishReason):
    __slots__ = ()

    def absorb(self, value: dict[str, Any]) -> None:
        choices = value.get("choices")
        if not choices or type(choices) is not list:
            return
        # The first choice speaks for the answer (n > 1 is rare; its choices interleave).
        choice = choices[0]
        if type(choice) is not dict or choice.get("index", 0) not in (0, None):
            return
        if not self.tool_calls:
            message = choice.get("delta") or choice.get("message")
            if type(message) is dict and message.get("tool_calls"):
                self.tool_calls = True
        reason = choice.get("finish_reason")
        if reason is not None and type(reason) is str:
            self.reason = CHAT_FINISH.get(reason, OTHER)


class _ResponsesFinish(FinishReason):
    __slots__ = ()

    def absorb(self, value: dict[str, Any]) -> None:
        kind = value.get("type")
        if kind is None:
            response = value if value.get("object") == "response" else None
        elif kind in RESPONSES_TERMINAL_EVENTS:
            response = value.get("response")
        else:
            return
        if type(response) is dict:
            reason = responses_finish(response)
            if reason is not None:
                self.reason = reason


class _MessagesFinish(FinishReason):
    __slots__ = ()

    def absorb(self, value: dict[str, Any]) -> None:
        kind = value.get("type")
        if kind == "message_delta":
            delta = value.get("delta")
            reason = delta.get("stop_reason") if type(delta) is dict else None
        elif kind == "message":
            reason = value.get("stop_reason")
        else:
            return
        if type(reason) is str:
            self.reason = ANTHROPIC_FINISH.get(reason, OTHER)


_FINISH_READERS: dict[str | None, type[FinishReason]] = {
    RequestKind.CHAT_COMPLETIONS: _ChatFinish,
    RequestKind.RESPONSES: _ResponsesFinish,
    RequestKind.MESSAGES: _MessagesFinish,
}


class KeyScrubber:
    """Removes the partner key the gateway sent from text and from parsed JSON.

    Structural: every string of the parsed value is checked, so a key the partner wrote
    JSON-escaped (``\\u0073k-…``) is caught as well as a verbatim one.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        # A key holding characters JSON escapes would not appear verbatim in serialized
        # output, so the quick check in ``dumps`` could not be trusted for it.
        self._verbatim_in_json = _JSON_ESCAPED.search(key) is None

    def text(self, text: str) -> str:
        if self.key and self.key in text:
            return text.replace(self.key, REDACTED)
        return text

    def value(self, value: Any) -> Any:
        """A copy of a JSON value with the key removed from every string, keys included."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.text(name): self.value(item) for name, item in value.items()}
        return value

    def dumps(self, value: Any) -> str:
        """``value`` serialized without the key in any of its strings.

        Serializing first and searching the output once keeps the common case (no key)
        at one fast substring search; only a hit pays for the walk.
        """
        serialized = dumps(value)
        if self.key and (not self._verbatim_in_json or self.key in serialized):
            serialized = dumps(self.value(value))
        return serialized


class CheckpointIdentifiers:
    """What tells an experiment's checkpoints apart, replaced in upstream error text.

    Internal ids become the public id; base URLs, origins, hosts and the path segments
    that differ between checkpoints become ``NEUTRAL_LOCATION``. All checkpoints' at
    once, in one pass, longest first: whichever checkpoint the partner named, the client
    reads the same words.
    """

    def __init__(self, *, model_ids: Iterable[str], locations: Iterable[str]) -> None:
        # None: the public id of the request, filled in at replacement time.
        replacements: dict[str, str | None] = {
            text.lower(): NEUTRAL_LOCATION for text in locations if text
        }
        replacements.update({model_id.lower(): None for model_id in model_ids if model_id})
        self._replacements = replacements
        self._pattern = (
            re.compile(
                "|".join(re.escape(t) for t in sorted(replacements, key=len, reverse=True)),
                re.IGNORECASE,
            )
            if replacements
            else None
        )

    def replace(self, text: str, public_model_id: str) -> str:
        if self._pattern is None:
            return text

        def substitute(match: re.Match[str]) -> str:
            return self._replacements.get(match.group(0).lower(), NEUTRAL_LOCATION) or (
                public_model_id
            )

        return self._pattern.sub(substitute, text)


@functools.lru_cache(maxsize=256)
def checkpoint_identifiers(
    checkpoints: tuple[tuple[str, str | None], ...],
) -> CheckpointIdentifiers:
    """The identifiers of a set of checkpoints, given as ``(base_url, internal_id)``.

    Cached by value: routing payloads change only when a checkpoint does, so the set and
    its pattern are built once per payload, not per request.
    """
    locations: list[str] = []
    segment_sets: list[set[str]] = []
    for base_url, _ in checkpoints:
        parts = urlsplit(base_url)
        locations += [base_url, f"{parts.scheme}://{parts.netloc}", parts.netloc]
        locations.append(parts.hostname or "")
        segment_sets.append({segment for segment in parts.path.split("/") if segment})
    if segment_sets:
        # e.g. /deployments/rc1-east/v1 vs /deployments/rc2-west/v1: rc1-east and rc2-west.
        locations += set().union(*segment_sets) - set.intersection(*segment_sets)
    return CheckpointIdentifiers(
        model_ids=[internal_id for _, internal_id in checkpoints if internal_id],
        locations=locations,
    )


@dataclass
class Blinder:
    public_model_id: str
    scrubber: KeyScrubber
    identifiers: CheckpointIdentifiers
    usage: TokenUsage = field(default_factory=TokenUsage)
    finish: FinishReason = field(default_factory=FinishReason)

    @classmethod
    def for_route(cls, route: Route, kind: str | None = None) -> Blinder:
        return cls(
            route.public_model_id,
            KeyScrubber(route.api_key),
            route.identifiers,
            finish=FinishReason.for_kind(kind),
        )

    def rewrite(self, value: Any) -> Any:
        """Rewrite ``model`` fields and error objects in place; collect usage and the
        finish reason."""
        if isinstance(value, dict):
            self.finish.absorb(value)
            self._blind_fields(value)
            self.usage.absorb(value.get("usage"))
            for nested in ("message", "response"):
                inner = value.get(nested)
                if isinstance(inner, dict):
                    self._blind_fields(inner)
                    self.usage.absorb(inner.get("usage"))
            if value.get("type") == "error" and "error" not in value:
                # A Responses stream error event carries its fields at the top level.
                sequence = value.get("sequence_number")
                kept = self._error_fields(value)
                value.clear()
                value.update(kept)
                if _is_int(sequence):
                    value["sequence_number"] = sequence
        return value

    def _blind_fields(self, value: dict[str, Any]) -> None:
        if "model" in value:
            value["model"] = self.public_model_id
        for name in FINGERPRINT_FIELDS:
            if name in value:
                # Kept as null: the field stays where SDKs expect it.
                value[name] = None
        error = value.get("error")
        if isinstance(error, dict):
            value["error"] = self._error_fields(error)

    def _error_text(self, text: str) -> str:
        # The key first: replacing identifiers inside it could hide it from the scrubber.
        return self.identifiers.replace(self.scrubber.text(text), self.public_model_id)

    def _error_fields(self, source: dict[str, Any]) -> dict[str, Any]:
        """``message``, ``type`` and ``code`` of an upstream error object, blinded."""
        kept: dict[str, Any] = {}
        for name in ("message", "type", "code"):
            value = source.get(name)
            if isinstance(value, str):
                kept[name] = self._error_text(value)
            elif name == "code" and name in source and (value is None or _is_int(value)):
                kept[name] = value
        return kept

    def body(self, raw: bytes) -> bytes:
        """A blinded non-streaming JSON body; raises ValueError if it is not JSON."""
        try:
            value = json.loads(raw)
            self.rewrite(value)
            return self.scrubber.dumps(value).encode("utf-8")
        except RecursionError:
            raise ValueError("nested too deeply") from None

    def error_body(self, raw: bytes, status: int) -> bytes:
        """An upstream error body rebuilt in the OpenAI shape (SPEC §8)."""
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = None
        source: Any = value.get("error") if isinstance(value, dict) else None
        if isinstance(source, str):
            source = {"message": source}
        elif source is None and isinstance(value, dict):
            source = value
        kept = self._error_fields(source) if isinstance(source, dict) else {}
        if "message" in kept:
            error = {
                "message": kept["message"],
                "type": kept.get("type", "upstream_error"),
                "code": kept.get("code"),
            }
        else:
            error = {
                "message": f"The model provider returned HTTP {status}.",
                "type": "upstream_error",
                "code": f"upstream_http_{status}",
            }
        return dumps({"error": error}).encode("utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def client_headers(upstream_headers) -> dict[str, str]:
    """The only upstream header a client may see: a well-formed ``retry-after``, re-written."""
    value = upstream_headers.get("retry-after")
    retry_after = _retry_after(value) if value else None
    return {"retry-after": retry_after} if retry_after else {}


def _retry_after(value: str) -> str | None:
    value = value.strip()
    if value.isascii() and value.isdigit():
        return str(int(value))
    try:
        # Re-formatted from the parsed instant: nothing of the partner's text survives.
        return http_date(parse_http_date(value))
    except ValueError:
        return None
