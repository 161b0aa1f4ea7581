"""The strict upstream allowlist (SPEC §5): one definition for validation and the editor."""

from __future__ import annotations

import copy
import json
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from pydantic import ValidationError as PydanticValidationError


class AiSdkProvider(StrEnum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    OPENAI_COMPATIBLE = "openai-compatible"
    OPENROUTER = "openrouter"
    ALIBABA = "alibaba"
    MISTRAL = "mistral"


class ApiAdapter(StrEnum):
    OPENAI_COMPLETIONS = "openai-completions"
    OPENAI_RESPONSES = "openai-responses"
    ANTHROPIC_MESSAGES = "anthropic-messages"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_enum_values=True)


class OpencodeSettings(_Strict):
    ai_sdk_provider: AiSdkProvider | None = Field(
        default=None, title="AI SDK provider", description="Which API family the checkpoint speaks."
    )


class OpenclawSettings(_Strict):
    api_adapter: ApiAdapter | None = Field(
        default=None,
        title="API adapter",
        description="Which API family the checkpoint speaks, for openclaw clients.",
    )


class UpstreamConfig(_Strict):
    model_config = ConfigDict(title="Upstream")

    internal_id: StrictStr = Field(
        min_length=1, title="Internal model id", description="Model id sent upstream."
    )
    base_url: StrictStr = Field(
        title="Base URL", description="Upstream API root, e.g. https://partner.example/v1"
    )
    opencode_settings: OpencodeSettings | None = Field(default=None, title="opencode settings")
    openclaw_settings: OpenclawSettings | None = Field(default=None, title="openclaw settings")
    extra_body: dict[str, Any] | None = Field(
        default=None, description="Shallow-merged into the request body."
    )
    remove_from_body: list[StrictStr] | None = Field(
        default=None, description="Top-level body keys deleted before anything else."
    )
    add_cache_breakpoints: StrictBool | None = Field(
        default=None, description="Mark prompt-cache breakpoints (chat completions)."
    )
    inject_reasoning_into_content: StrictBool | None = Field(
        default=None, description="Fold assistant reasoning into content as <think>…</think>."
    )

    @field_validator("internal_id")
    @classmethod
    def _internal_id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. https://partner.example/v1")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; put the key in the key field")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value.rstrip("/")


class UpstreamInvalid(Exception):
    """Raised with per-field messages, ready to show next to the offending field."""

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()))


#: ``extra_body`` is shallow-merged into request bodies; nothing legitimate nests deeper.
MAX_NESTING = 32


def _nul_or_depth_error(raw: Any) -> dict[str, list[str]] | None:
    """The first NUL character (PostgreSQL cannot store it) or over-deep nesting, if any.

    Walked with an explicit stack: recursion is what a deeply nested document breaks.
    """
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        location = where or "upstream"
        if depth > MAX_NESTING:
            return {location: [f"is nested more than {MAX_NESTING} levels deep"]}
        if isinstance(node, str) and "\x00" in node:
            return {location: ["must not contain a NUL character"]}
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and "\x00" in key:
                    return {location: ["must not have a key containing a NUL character"]}
                stack.append((value, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(node, list):
            stack.extend(
                (item, f"{location}.{index}", depth + 1) for index, item in enumerate(node)
            )
    return None


def validate_upstream(raw: Any) -> dict[str, Any]:
    """Validate against the allowlist; return the normalized JSON to store (no nulls)."""
    if not isinstance(raw, dict):
        raise UpstreamInvalid({"upstream": ["must be a JSON object"]})
    problem = _nul_or_depth_error(raw)
    if problem:
        raise UpstreamInvalid(problem)
    try:
        document = json.dumps(raw, allow_nan=False)
    except (TypeError, ValueError):
        raise UpstreamInvalid({"upstream": ["must be plain JSON"]}) from None
    try:
        # JSON mode: strict types still hold (no "1" for true), but enum fields
        # accept their string values, which Python-mode strict validation refuses.
        config = UpstreamConfig.model_validate_json(document)
    except PydanticValidationError as exc:
        errors: dict[str, list[str]] = {}
        for err in exc.errors(include_url=False, include_input=False):
            loc = ".".join(str(part) for part in err["loc"]) or "upstream"
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "is not an allowed field"
            errors.setdefault(loc, []).append(message)
        raise UpstreamInvalid(errors) from None
    return config.model_dump(mode="json", exclude_none=True)


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {k: v for k, v in node.items() if k != "$ref"}
            return _inline_refs({**copy.deepcopy(target), **merged}, defs)
        if "anyOf" in node:
            # `X | None`: the editor wants the X; absence already means None.
            options = [opt for opt in node["anyOf"] if opt.get("type") != "null"]
            if len(options) == 1:
                rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
                return _inline_refs({**options[0], **rest}, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


#: A free-form value the editor can hold: it offers a type picker per added key,
#: so a number stays a number instead of becoming a string.
_EDITOR_FREE_VALUE = {
    "anyOf": [
        {"type": "string", "title": "text"},
        {"type": "number", "title": "number"},
        {"type": "boolean", "title": "true/false"},
    ]
}


def _fit_for_editor(node: Any) -> Any:
    """django-jsonform needs ``properties`` on every object and a type for free values."""
    if isinstance(node, dict):
        node = {k: _fit_for_editor(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" not in node:
            node["properties"] = {}
        if node.get("additionalProperties") is True:
            node["additionalProperties"] = copy.deepcopy(_EDITOR_FREE_VALUE)
        return node
    if isinstance(node, list):
        return [_fit_for_editor(item) for item in node]
    return node


def upstream_json_schema() -> dict[str, Any]:
    """JSON schema of UpstreamConfig with references inlined (for django-jsonform)."""
    schema = UpstreamConfig.model_json_schema()
    defs = schema.get("$defs", {})
    return _fit_for_editor(_inline_refs(schema, defs))
