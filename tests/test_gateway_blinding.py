"""Blinding units (SPEC §8): structural model rewrite, rebuilt error bodies, key scrubbing,
the one upstream header a client may see."""

from __future__ import annotations

import json

import pytest

from gateway.blinding import (
    REDACTED,
    Blinder,
    KeyScrubber,
    checkpoint_identifiers,
    client_headers,
)

KEY = "sk-canary-7f3c9a1e5b2d4c6a8e0f1a3b5c7d9e1f"
SLOTS = (
    ("https://east.partner.example/deployments/rc1-east/v1", "partner-rc1"),
    ("https://west.partner.example:8443/deployments/rc2-west/v1", "partner-rc2"),
)


def _blinder(key: str = KEY) -> Blinder:
    return Blinder("kilo/pub", KeyScrubber(key), checkpoint_identifiers(SLOTS))


def test_model_fields_are_rewritten_and_content_naming_checkpoints_is_untouched():
    content = "partner-rc1 vs partner-rc2 on east.partner.example"
    raw = json.dumps({"model": "partner-rc1", "choices": [{"message": {"content": content}}]})
    body = json.loads(_blinder().body(raw.encode()))
    assert body["model"] == "kilo/pub"
    assert body["choices"][0]["message"]["content"] == content


def test_the_key_is_scrubbed_verbatim_json_escaped_and_in_field_names():
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    raw = f'{{"model":"m","a":"x {KEY} y","b":["{escaped}"],"{KEY}":1}}'.encode()
    body = _blinder().body(raw).decode()
    assert KEY not in body
    assert json.loads(body) == {
        "model": "kilo/pub",
        "a": f"x {REDACTED} y",
        "b": [REDACTED],
        REDACTED: 1,
    }


def test_a_body_nested_too_deeply_is_not_json_to_us():
    with pytest.raises(ValueError):
        _blinder().body(b"[" * 100_000 + b"]" * 100_000)


def test_an_error_body_keeps_only_message_type_and_code():
    raw = json.dumps(
        {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}}
    )
    assert json.loads(_blinder().error_body(raw.encode(), 400)) == {
        "error": {"message": "bad", "type": "invalid_request_error", "code": "c"}
    }


def test_an_anthropic_error_body_is_rebuilt_in_the_openai_shape():
    raw = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert json.loads(_blinder().error_body(raw.encode(), 529)) == {
        "error": {"message": "busy", "type": "overloaded_error", "code": None}
    }


@pytest.mark.parametrize("raw", [b"<html>502</html>", b'{"detail": 1}', b"[]", b'{"error": 5}'])
def test_an_error_body_without_a_message_gets_a_generic_one(raw):
    assert json.loads(_blinder().error_body(raw, 502)) == {
        "error": {
            "message": "The model provider returned HTTP 502.",
            "type": "upstream_error",
            "code": "upstream_http_502",
        }
    }


def test_every_checkpoints_identifiers_are_replaced_in_error_text_whichever_was_named():
    messages = [
        f"Deployment {deployment} ({internal_id}) failed at {base_url}/chat/completions"
        for base_url, internal_id in SLOTS
        for deployment in (base_url.split("/")[4],)
    ]
    rebuilt = [
        _blinder().error_body(json.dumps({"error": {"message": m}}).encode(), 500) for m in messages
    ]
    assert rebuilt[0] == rebuilt[1]
    assert json.loads(rebuilt[0])["error"]["message"] == (
        "Deployment upstream (kilo/pub) failed at upstream/chat/completions"
    )


def test_hosts_are_replaced_in_any_case_and_with_or_without_port():
    text = "WEST.partner.example and west.partner.example:8443 and east.partner.example"
    replaced = checkpoint_identifiers(SLOTS).replace(text, "kilo/pub")
    assert replaced == "upstream and upstream and upstream"


def test_path_segments_shared_by_every_checkpoint_are_kept():
    assert checkpoint_identifiers(SLOTS).replace("deployments v1", "kilo/pub") == ("deployments v1")


def test_the_key_in_an_error_is_scrubbed_before_identifiers_are_replaced():
    key = "sk-rc1-east-secret-0000"  # holds a checkpoint's identifier
    raw = json.dumps({"error": {"message": f"bad key {key}", "param": key, "type": key}})
    body = _blinder(key).error_body(raw.encode(), 401).decode()
    assert key not in body and "secret-0000" not in body


@pytest.mark.parametrize(
    ("value", "passed"),
    [
        ("7", "7"),
        (" 120 ", "120"),
        ("Wed, 21 Oct 2037 07:28:00 GMT", "Wed, 21 Oct 2037 07:28:00 GMT"),
        ("Wednesday, 21-Oct-37 07:28:00 GMT", "Wed, 21 Oct 2037 07:28:00 GMT"),
        (KEY, None),
        (f"7 {KEY}", None),
        ("-1", None),
        ("1.5", None),
        ("٣", None),
    ],
)
def test_retry_after_passes_only_as_delta_seconds_or_an_http_date(value, passed):
    headers = client_headers({"retry-after": value, "x-echo-key": KEY, "set-cookie": "a=b"})
    assert headers == ({"retry-after": passed} if passed else {})
