"""The strict upstream allowlist (SPEC §5): exactly these fields, strictly typed."""

from __future__ import annotations

import json

import pytest

from experiments.upstream import (
    AiSdkProvider,
    ApiAdapter,
    UpstreamConfig,
    UpstreamInvalid,
    upstream_json_schema,
    validate_upstream,
)

ALLOWED_FIELDS = {
    "internal_id",
    "base_url",
    "opencode_settings",
    "openclaw_settings",
    "extra_body",
    "remove_from_body",
    "add_cache_breakpoints",
    "inject_reasoning_into_content",
}
MINIMAL = {"internal_id": "partner-rc1", "base_url": "https://partner.example/v1"}
FULL = {
    **MINIMAL,
    "opencode_settings": {"ai_sdk_provider": "openai-compatible"},
    "openclaw_settings": {"api_adapter": "openai-completions"},
    "extra_body": {"temperature": 0.2, "reasoning": {"effort": "high"}},
    "remove_from_body": ["stream_options", "metadata"],
    "add_cache_breakpoints": True,
    "inject_reasoning_into_content": False,
}


def _errors(raw) -> dict[str, list[str]]:
    with pytest.raises(UpstreamInvalid) as invalid:
        validate_upstream(raw)
    return invalid.value.errors


# --- accepted ----------------------------------------------------------------------


def test_every_allowed_field_is_accepted():
    assert set(FULL) == ALLOWED_FIELDS
    assert validate_upstream(FULL) == FULL


def test_internal_id_and_base_url_are_enough():
    assert validate_upstream(MINIMAL) == MINIMAL


def test_nulls_are_dropped_from_the_stored_json():
    assert validate_upstream({**MINIMAL, "extra_body": None, "opencode_settings": {}}) == {
        **MINIMAL,
        "opencode_settings": {},
    }


def test_trailing_slash_of_base_url_is_dropped():
    assert validate_upstream({**MINIMAL, "base_url": "http://127.0.0.1:9/v1/"})["base_url"] == (
        "http://127.0.0.1:9/v1"
    )


@pytest.mark.parametrize("provider", [p.value for p in AiSdkProvider])
def test_every_ai_sdk_provider_is_accepted(provider):
    config = validate_upstream({**MINIMAL, "opencode_settings": {"ai_sdk_provider": provider}})
    assert config["opencode_settings"] == {"ai_sdk_provider": provider}


@pytest.mark.parametrize("adapter", [a.value for a in ApiAdapter])
def test_every_api_adapter_is_accepted(adapter):
    config = validate_upstream({**MINIMAL, "openclaw_settings": {"api_adapter": adapter}})
    assert config["openclaw_settings"] == {"api_adapter": adapter}


def test_the_enums_are_exactly_the_specified_values():
    assert {p.value for p in AiSdkProvider} == {
        "anthropic",
        "openai",
        "openai-compatible",
        "openrouter",
        "alibaba",
        "mistral",
    }
    assert {a.value for a in ApiAdapter} == {
        "openai-completions",
        "openai-responses",
        "anthropic-messages",
    }


# --- refused -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["api_key", "extra_headers", "headers", "apiKey", "model"])
def test_a_field_outside_the_allowlist_is_refused(field):
    [message] = _errors({**MINIMAL, field: "x"})[field]
    assert message.startswith(f"'{field}' is not an allowed field")


@pytest.mark.parametrize(
    ("raw", "location"),
    [
        ({**MINIMAL, "opencode_settings": {"api_key": "x"}}, "opencode_settings.api_key"),
        ({**MINIMAL, "openclaw_settings": {"headers": {}}}, "openclaw_settings.headers"),
    ],
)
def test_an_unknown_nested_field_is_refused_at_its_path(raw, location):
    [message] = _errors(raw)[location]
    assert "is not an allowed field" in message


def test_a_key_in_a_refused_field_is_not_echoed(canary_key):
    with pytest.raises(UpstreamInvalid) as invalid:
        validate_upstream({**MINIMAL, "api_key": canary_key, "extra_headers": canary_key})
    assert canary_key not in str(invalid.value)
    assert canary_key not in json.dumps(invalid.value.errors)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("add_cache_breakpoints", "true"),
        ("add_cache_breakpoints", 1),
        ("inject_reasoning_into_content", "false"),
        ("internal_id", 1),
        ("base_url", ["https://partner.example/v1"]),
        ("extra_body", "temperature=0"),
        ("extra_body", ["temperature"]),
        ("remove_from_body", "metadata"),
        ("opencode_settings", "openai"),
    ],
)
def test_a_wrong_type_is_refused_strictly(field, value):
    errors = _errors({**MINIMAL, field: value})
    assert list(errors) == [field]


def test_a_non_string_item_in_remove_from_body_is_refused_at_its_index():
    assert list(_errors({**MINIMAL, "remove_from_body": ["metadata", 7]})) == ["remove_from_body.1"]


@pytest.mark.parametrize(
    ("raw", "location"),
    [
        (
            {**MINIMAL, "opencode_settings": {"ai_sdk_provider": "azure"}},
            "opencode_settings.ai_sdk_provider",
        ),
        (
            {**MINIMAL, "opencode_settings": {"ai_sdk_provider": "OpenAI"}},
            "opencode_settings.ai_sdk_provider",
        ),
        (
            {**MINIMAL, "openclaw_settings": {"api_adapter": "grpc"}},
            "openclaw_settings.api_adapter",
        ),
        (
            {**MINIMAL, "openclaw_settings": {"api_adapter": 1}},
            "openclaw_settings.api_adapter",
        ),
        (
            {**MINIMAL, "opencode_settings": {"ai_sdk_provider": True}},
            "opencode_settings.ai_sdk_provider",
        ),
    ],
)
def test_an_invalid_enum_value_is_refused(raw, location):
    assert list(_errors(raw)) == [location]


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://partner.example/v1",
        "partner.example/v1",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "https://",
        "https://user:secret@partner.example/v1",
        "https://partner.example/v1?key=secret",
        "",
    ],
)
def test_base_url_must_be_a_plain_http_url(base_url):
    errors = _errors({**MINIMAL, "base_url": base_url})
    assert list(errors) == ["base_url"]
    if "secret" in base_url:
        assert "secret" not in json.dumps(errors)


@pytest.mark.parametrize("internal_id", ["", "   "])
def test_blank_internal_id_is_refused(internal_id):
    assert list(_errors({**MINIMAL, "internal_id": internal_id})) == ["internal_id"]


@pytest.mark.parametrize("missing", ["internal_id", "base_url"])
def test_required_fields_are_required(missing):
    raw = {k: v for k, v in MINIMAL.items() if k != missing}
    assert list(_errors(raw)) == [missing]


@pytest.mark.parametrize("raw", [None, "https://partner.example/v1", ["internal_id"], 7])
def test_upstream_must_be_an_object(raw):
    assert _errors(raw) == {"upstream": ["The upstream must be a JSON object."]}


def test_each_bad_field_gets_its_own_message():
    errors = _errors(
        {"base_url": "ftp://x", "add_cache_breakpoints": "yes", "api_key": "k", "extra_body": 3}
    )
    assert set(errors) == {
        "internal_id",
        "base_url",
        "add_cache_breakpoints",
        "api_key",
        "extra_body",
    }
    assert all(messages and all(messages) for messages in errors.values())


def test_the_exception_message_names_every_bad_field():
    with pytest.raises(UpstreamInvalid) as invalid:
        validate_upstream({**MINIMAL, "base_url": "ftp://x", "api_key": "k"})
    assert "Base URL must be an http(s) URL" in str(invalid.value)
    assert "'api_key' is not an allowed field" in str(invalid.value)


# --- the editor's schema -----------------------------------------------------------


def _walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def test_editor_schema_has_no_references():
    schema = upstream_json_schema()
    assert not any(
        isinstance(node, dict) and ("$ref" in node or "$defs" in node) for node in _walk(schema)
    )


def test_editor_schema_lists_exactly_the_allowed_fields():
    schema = upstream_json_schema()
    assert set(schema["properties"]) == ALLOWED_FIELDS
    assert set(schema["properties"]) == set(UpstreamConfig.model_fields)
    assert set(schema["required"]) == {"internal_id", "base_url"}
    assert schema["additionalProperties"] is False


def test_editor_schema_carries_the_nested_enums():
    properties = upstream_json_schema()["properties"]
    opencode = properties["opencode_settings"]
    openclaw = properties["openclaw_settings"]
    assert set(opencode["properties"]) == {"ai_sdk_provider"}
    assert set(opencode["properties"]["ai_sdk_provider"]["enum"]) == {
        p.value for p in AiSdkProvider
    }
    assert set(openclaw["properties"]["api_adapter"]["enum"]) == {a.value for a in ApiAdapter}
    assert opencode["additionalProperties"] is False
