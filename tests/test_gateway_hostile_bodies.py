"""Hostile request bodies and headers (SPEC §8 HTTP hygiene, §9 no lost rows): clear 400s.

Rule for usage rows, checked here: a request refused before routing (body too large, not
JSON, nested too deep, bad Unicode, no usable `model`, an unstorable `X-Kilo-Request`) writes
no row; a request that reached routing writes exactly one, whatever its outcome.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from experiments.models import ExperimentRequest
from gateway.models import GatewayUsage
from gateway.views import MAX_JSON_DEPTH, has_lone_surrogate
from tests.gateway_server import requires_server, wait_for_rows
from tests.gateway_support import active_experiment, wait_listed
from tests.test_gateway_api_shape import assert_openai_error, call_gateway

CANARY = "canary-51d0"


def deep_body(depth: int, model: str = "kilo/x") -> bytes:
    """A JSON object (depth 1) whose `x` holds lists nested to reach ``depth`` in all."""
    lists = depth - 1
    return f'{{"model": "{model}", "x": {"[" * lists}{"]" * lists}}}'.encode()


# --- in-process: refused before routing, so no database is needed -----------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 100_000])
def test_json_nested_deeper_than_the_bound_is_400(depth):
    response = call_gateway("POST", "/v1/chat/completions", content=deep_body(depth))
    assert_openai_error(response, 400, "too_deep")


def test_json_nested_exactly_to_the_bound_is_not_refused_for_depth():
    # An empty model makes the request stop at the next check, before routing.
    body = deep_body(MAX_JSON_DEPTH, model="")
    response = call_gateway("POST", "/v1/chat/completions", content=body)
    assert_openai_error(response, 400, "invalid_model")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"model": "kilo/x", "x": NaN}', id="nan"),
        pytest.param(b'{"model": "kilo/x", "x": -Infinity}', id="infinity"),
        pytest.param(b'{"model": "kilo/x", "x": "a\x00b"}', id="raw-nul-byte"),
    ],
)
def test_json_that_is_not_standard_json_is_400(content):
    response = call_gateway("POST", "/v1/chat/completions", content=content)
    assert_openai_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(rb'{"model": "kilo/x", "messages": [{"content": "a\u0000b"}]}', id="value"),
        pytest.param(rb'{"model": "kilo/x", "x": {"k\u0000": 1}}', id="key"),
    ],
)
def test_escaped_nul_anywhere_in_the_body_is_400(content):
    response = call_gateway("POST", "/v1/chat/completions", content=content)
    assert_openai_error(response, 400, "invalid_unicode")


def test_an_escaped_backslash_before_u0000_text_is_not_a_nul():
    # "\\u0000" is a backslash followed by the text u0000: no NUL, so the next check speaks.
    response = call_gateway(
        "POST", "/v1/chat/completions", content=rb'{"model": "", "x": "\\u0000"}'
    )
    assert_openai_error(response, 400, "invalid_model")


#: Pieces of a JSON string literal's content: surrogate escapes of both kinds and cases, and
#: the escapes that could be mistaken for (or hide) one.
STRING_PIECES = [
    r"\ud83d",
    r"\uDBFF",
    r"\ude00",
    r"\uDC00",
    r"\\",
    r"\u005c",
    r"\"",
    r"\n",
    "u",
    "d800",
    "a",
    "é",
    r"\u0041",
]


def decodes_to_a_lone_surrogate(text: str) -> bool:
    try:
        json.loads(text).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@given(st.lists(st.sampled_from(STRING_PIECES), max_size=12))
@example([r"\ud83d", r"\\", r"\ude00"])  # an escaped backslash keeps the two apart
@example([r"\\", "u", "d800"])  # a backslash, then text: no escape at all
@hypothesis_settings(max_examples=500)
def test_lone_surrogate_detection_agrees_with_decoding_the_json(pieces):
    text = '"' + "".join(pieces) + '"'
    assert has_lone_surrogate(text) == decodes_to_a_lone_surrogate(text)


# --- through a real server: what reaches the partner, the rows and the log ---------------


def post_raw(gateway, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=10,
    )


def chat(model: str, text: str = "hello") -> bytes:
    return f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{text}"}}]}}'.encode()


@requires_server
@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda model: chat(model, r"lone \ud800 high"), id="escaped-high"),
        pytest.param(lambda model: chat(model, r"lone \uDC00 low"), id="escaped-low"),
        pytest.param(lambda model: chat(model, r"\ude00\ud83d reversed"), id="reversed-pair"),
        pytest.param(lambda model: chat(model).replace(b"hello", b"\xed\xa0\x80"), id="raw-bytes"),
    ],
)
def test_lone_surrogate_in_content_is_400_and_reaches_neither_partner_nor_rows(
    gateway, upstream, content
):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = post_raw(gateway, content(exp.public_model_id))
    assert_openai_error(response, 400, "invalid_unicode")
    assert upstream.received == []
    # The next request's rows land alone: the refused one wrote none.
    assert post_raw(gateway, chat(exp.public_model_id)).status_code == 200
    wait_for_rows(1, 1)


@requires_server
def test_surrogate_pair_escapes_are_accepted_and_forwarded_as_the_character(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = post_raw(gateway, chat(exp.public_model_id, r"smile \ud83d\ude00"))
    assert response.status_code == 200
    assert upstream.received[-1]["json"]["messages"][0]["content"] == "smile \U0001f600"


@requires_server
@pytest.mark.parametrize(
    ("model", "code"),
    [
        pytest.param(rf"kilo/\u0000{CANARY}", "invalid_unicode", id="nul"),
        pytest.param(rf"kilo/\ud800{CANARY}", "invalid_unicode", id="lone-surrogate"),
        pytest.param(rf"kilo/{CANARY}\nforged log line", "invalid_model", id="newline"),
        pytest.param(rf"kilo/{CANARY}\u202e", "invalid_model", id="format-character"),
        pytest.param(f"kilo/{CANARY}" + "x" * 300, "invalid_model", id="too-long"),
    ],
)
def test_unstorable_model_is_400_never_logged_and_no_row_is_lost(gateway, model, code):
    response = post_raw(gateway, chat(model))
    assert_openai_error(response, 400, code)
    # A request for an unknown (but storable) model reaches routing and writes its row.
    assert post_raw(gateway, chat("kilo/no-such-model")).status_code == 404
    wait_for_rows(1, 0)
    assert GatewayUsage.objects.get().public_model_id == "kilo/no-such-model"
    assert CANARY not in gateway.log()


@requires_server
@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param(b"r" * 513, id="too-long"),
        pytest.param(b"req-\x85-next-line", id="c1-control"),
        pytest.param(b"req-\xa0-nbsp", id="non-printable"),
    ],
)
def test_client_request_id_that_cannot_be_stored_as_sent_is_400(gateway, upstream, request_id):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = post_raw(gateway, chat(exp.public_model_id), {"x-kilo-request": request_id})
    assert_openai_error(response, 400, "invalid_header")
    assert "X-Kilo-Request" in response.json()["error"]["message"]
    assert upstream.received == []


@requires_server
def test_client_request_id_up_to_the_bound_is_stored_exactly(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    request_id = "r-" + "é" * 200 + "x" * 310
    response = post_raw(
        gateway, chat(exp.public_model_id), {"x-kilo-request": request_id.encode("latin-1")}
    )
    assert response.status_code == 200
    wait_for_rows(1, 1)
    assert ExperimentRequest.objects.get().client_request_id == request_id
