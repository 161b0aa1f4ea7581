"""The strict upstream allowlist (SPEC §5): one definition for validation and the editor."""

from __future__ import annotations

import copy
import json
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from pydantic import ValidationError as PydanticValidationError

from experiments.models import RequestKind


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
    """Raised with per-location messages, ready to show next to the offending field.

    ``errors`` maps a location (``base_url``, ``opencode_settings.ai_sdk_provider``, or
    ``upstream`` for the whole document) to sentences that name the field the way the
    editor labels it: "Base URL must be an http(s) URL with a host, …".
    """

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = errors
        super().__init__(" ".join(message for messages in errors.values() for message in messages))


#: ``extra_body`` is shallow-merged into request bodies; nothing legitimate nests deeper.
MAX_NESTING = 32


def _nul_or_depth_error(raw: Any) -> dict[str, list[str]] | None:
    """The first NUL character (PostgreSQL cannot store it) or over-deep nesting, if any.

    Walked with an explicit stack: recursion is what a deeply nested document breaks.
    """
    stack: list[tuple[Any, tuple[Any, ...], int]] = [(raw, (), 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_NESTING:
            return _problem(where, f"is nested more than {MAX_NESTING} levels deep")
        if isinstance(node, str) and "\x00" in node:
            return _problem(where, "must not contain a NUL character")
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and "\x00" in key:
                    return _problem(where, "must not have a key containing a NUL character")
                stack.append((value, (*where, key), depth + 1))
        elif isinstance(node, list):
            stack.extend((item, (*where, index), depth + 1) for index, item in enumerate(node))
    return None


def _problem(where: tuple[Any, ...], predicate: str) -> dict[str, list[str]]:
    return {_location(where): [f"{_label(where)} {predicate}."]}


def _location(where: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in where) or "upstream"


def _label(where: tuple[Any, ...]) -> str:
    """How the editor names a location: field titles, "item N" for list entries."""
    if not where:
        return "The upstream"
    names: list[str] = []
    model: type[BaseModel] | None = UpstreamConfig
    for part in where:
        if isinstance(part, int):
            names.append(f"item {part + 1}")
            model = None
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            names.append(repr(str(part)) if model is not None else str(part))
            model = None
            continue
        names.append(field.title or str(part).replace("_", " ").capitalize())
        nested = field.annotation
        model = next(
            (
                arg
                for arg in (*getattr(nested, "__args__", ()), nested)
                if isinstance(arg, type) and issubclass(arg, BaseModel)
            ),
            None,
        )
    return " › ".join(names)


#: pydantic error types, as what the value must be (the library's wording never shows).
_PREDICATES = {
    "missing": "is required",
    "extra_forbidden": "is not an allowed field",
    "string_too_short": "must not be empty",
    "string_type": "must be text",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "list_type": "must be a list",
}


def _predicate(error: dict[str, Any]) -> str:
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "value_error" and context.get("error"):
        return str(context["error"])
    if kind == "enum" and context.get("expected"):
        return f"must be one of {context['expected']}"
    if kind == "extra_forbidden" and error["loc"] and error["loc"][-1] == "api_key":
        return "is not an allowed field: the partner key goes in the key field"
    return _PREDICATES.get(kind, "is not valid here")


def validate_upstream(raw: Any) -> dict[str, Any]:
    """Validate against the allowlist; return the normalized JSON to store (no nulls)."""
    if not isinstance(raw, dict):
        raise UpstreamInvalid(_problem((), "must be a JSON object"))
    problem = _nul_or_depth_error(raw)
    if problem:
        raise UpstreamInvalid(problem)
    try:
        document = json.dumps(raw, allow_nan=False)
    except (TypeError, ValueError):
        raise UpstreamInvalid(_problem((), "must be plain JSON")) from None
    try:
        # JSON mode: strict types still hold (no "1" for true), but enum fields
        # accept their string values, which Python-mode strict validation refuses.
        config = UpstreamConfig.model_validate_json(document)
    except PydanticValidationError as exc:
        errors: dict[str, list[str]] = {}
        for err in exc.errors(include_url=False, include_input=False):
            where = tuple(err["loc"])
            errors.setdefault(_location(where), []).append(f"{_label(where)} {_predicate(err)}.")
        raise UpstreamInvalid(errors) from None
    return config.model_dump(mode="json", exclude_none=True)


def api_family(upstream: dict[str, Any]) -> RequestKind:
    """The request kind a checkpoint speaks: its ``ai_sdk_provider`` or openclaw adapter,
    else chat completions (what "openai-compatible" partners all serve)."""
    provider = (upstream.get("opencode_settings") or {}).get("ai_sdk_provider")
    if provider == AiSdkProvider.ANTHROPIC:
        return RequestKind.MESSAGES
    adapter = (upstream.get("openclaw_settings") or {}).get("api_adapter")
    if provider is None and adapter == ApiAdapter.ANTHROPIC_MESSAGES:
        return RequestKind.MESSAGES
    if provider is None and adapter == ApiAdapter.OPENAI_RESPONSES:
        return RequestKind.RESPONSES
    return RequestKind.CHAT_COMPLETIONS


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
