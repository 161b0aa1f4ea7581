"""Client blinding (SPEC §8): the client never learns which checkpoint served it.

``model`` fields are rewritten to the public id (top level, Anthropic
``message.model``, Responses ``response.model``), every other occurrence of the
internal id or the upstream root/host is scrubbed, and upstream response
headers are reduced to an allowlist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Upstream response headers a client may see. Content type is set by us.
FORWARDED_RESPONSE_HEADERS = ("retry-after",)
SCRUBBED = "upstream"
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


@dataclass
class Blinder:
    public_model_id: str
    #: The checkpoint's model id; replaced by the public id wherever it appears.
    internal_id: str | None
    #: Upstream root, host:port and host; replaced by a neutral word.
    upstream_texts: tuple[str, ...]
    usage: TokenUsage = field(default_factory=TokenUsage)

    def scrub(self, text: str) -> str:
        # Longest first so the base URL goes before its own host.
        for secret in sorted(self.upstream_texts, key=len, reverse=True):
            if secret and secret in text:
                text = text.replace(secret, SCRUBBED)
        if self.internal_id and self.internal_id != self.public_model_id:
            text = text.replace(self.internal_id, self.public_model_id)
        return text

    def rewrite(self, value: Any) -> Any:
        """Rewrite ``model`` fields in a response object and collect its usage."""
        if isinstance(value, dict):
            self._blind_fields(value)
            self.usage.absorb(value.get("usage"))
            for nested in ("message", "response"):
                inner = value.get(nested)
                if isinstance(inner, dict):
                    self._blind_fields(inner)
                    self.usage.absorb(inner.get("usage"))
        return value

    def _blind_fields(self, value: dict[str, Any]) -> None:
        if "model" in value:
            value["model"] = self.public_model_id
        for name in FINGERPRINT_FIELDS:
            if name in value:
                # Kept as null: the field stays where SDKs expect it.
                value[name] = None

    def body(self, raw: bytes) -> bytes:
        """A blinded non-streaming JSON body; raises ValueError if it is not JSON."""
        value = json.loads(raw)
        return self.scrub(dumps(self.rewrite(value))).encode("utf-8")

    def error_body(self, raw: bytes, status: int) -> bytes:
        """An upstream error body with its structure kept but every secret scrubbed."""
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("error"), dict):
            return self.scrub(dumps(self.rewrite(value))).encode("utf-8")
        generic = {
            "error": {
                "message": f"The model provider returned HTTP {status}.",
                "type": "upstream_error",
                "code": f"upstream_http_{status}",
            }
        }
        return dumps(generic).encode("utf-8")


def client_headers(upstream_headers) -> dict[str, str]:
    return {
        name: upstream_headers[name]
        for name in FORWARDED_RESPONSE_HEADERS
        if name in upstream_headers
    }
