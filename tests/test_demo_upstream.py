"""The demo partner upstream speaks what the official SDKs expect, and its faults are real."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.upstream import PARTNER_API_KEY

MODEL = "partner-internal-ckpt-7"


def openai_client(upstream, api_key: str = "sk-any", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=upstream.base_url, api_key=api_key, max_retries=0, **kwargs)


def anthropic_client(upstream, api_key: str = "sk-any") -> anthropic.Anthropic:
    # The Anthropic SDK appends /v1 itself.
    return anthropic.Anthropic(
        base_url=upstream.base_url.removesuffix("/v1"), api_key=api_key, max_retries=0
    )


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]


def test_chat_completion_echoes_last_user_message_model_and_usage(upstream):
    completion = openai_client(upstream).chat.completions.create(model=MODEL, messages=CHAT)
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.model == MODEL
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert completion.usage.total_tokens == 7


def test_chat_completion_stream_carries_model_in_every_chunk_and_final_usage(upstream):
    chunks = list(
        openai_client(upstream).chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert {c.model for c in chunks} == {MODEL}
    assert chunks[-1].usage.prompt_tokens == 4
    assert chunks[-1].usage.completion_tokens == 3


def test_chat_stream_ends_with_done_sentinel(upstream):
    body = {"model": MODEL, "messages": CHAT, "stream": True}
    response = httpx.post(f"{upstream.base_url}/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


def test_demo_chunks_sets_the_number_of_content_deltas(upstream):
    stream = openai_client(upstream).chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, extra_body={"demo_chunks": 7}
    )
    deltas = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) == 7
    assert "".join(c.choices[0].delta.content for c in deltas) == "echo: hello there"


def test_responses_non_streaming_parses_with_output_text_and_usage(upstream):
    response = openai_client(upstream).responses.create(
        model=MODEL, input="what is up", instructions="be kind"
    )
    assert response.output_text == "echo: what is up"
    assert response.model == MODEL
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 4)


def test_responses_stream_emits_created_deltas_and_completed_with_usage(upstream):
    events = list(
        openai_client(upstream).responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "stream me"}]}],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "echo: stream me"
    completed = events[-1].response
    assert completed.model == MODEL
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (2, 3)


def test_responses_stream_helper_accumulates_the_final_response(upstream):
    with openai_client(upstream).responses.stream(model=MODEL, input="hi again") as stream:
        final = stream.get_final_response()
    assert final.output_text == "echo: hi again"


def test_anthropic_message_non_streaming(upstream):
    message = anthropic_client(upstream).messages.create(
        model=MODEL,
        max_tokens=64,
        system="be terse",
        messages=[{"role": "user", "content": "ping pong"}],
    )
    assert message.content[0].text == "echo: ping pong"
    assert message.model == MODEL
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 3)


def test_anthropic_message_stream_accumulates_text_model_and_usage(upstream):
    with anthropic_client(upstream).messages.stream(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "stream please"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream please"
    assert final.model == MODEL
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 3)


def test_anthropic_raw_stream_event_order(upstream):
    events = list(
        anthropic_client(upstream).messages.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    kinds = [e.type for e in events if e.type != "ping"]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_models_lists_the_demo_checkpoints(upstream):
    ids = [m.id for m in openai_client(upstream).models.list()]
    assert ids == ["demo-model-rc1", "demo-model-rc2"]


def test_every_response_carries_partner_headers(upstream):
    response = httpx.post(
        f"{upstream.base_url}/chat/completions", json={"model": MODEL, "messages": CHAT}
    )
    assert response.headers["server"] == "demo-upstream"
    assert response.headers["x-upstream-model"] == MODEL
    assert response.headers["openai-organization"] == "partner-org"
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["x-upstream-host"] == upstream.host_port


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        ("http_500", openai.InternalServerError),
        ("http_429", openai.RateLimitError),
        ("http_400", openai.BadRequestError),
    ],
)
def test_http_fault_returns_that_status_naming_model_and_host(upstream, fault, error_class):
    with pytest.raises(error_class) as raised:
        openai_client(upstream).chat.completions.create(
            model=MODEL, messages=CHAT, extra_body={"demo_fault": fault}
        )
    assert MODEL in raised.value.message
    assert upstream.host_port in raised.value.message


def test_http_fault_on_messages_uses_anthropic_error_shape(upstream):
    with pytest.raises(anthropic.InternalServerError) as raised:
        anthropic_client(upstream).messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"demo_fault": "http_500"},
        )
    assert raised.value.body["type"] == "error"
    assert MODEL in raised.value.body["error"]["message"]


def test_unknown_fault_is_rejected_with_400(upstream):
    response = httpx.post(
        f"{upstream.base_url}/chat/completions",
        json={"model": MODEL, "messages": CHAT, "demo_fault": "meteor"},
    )
    assert response.status_code == 400
    assert "meteor" in response.json()["error"]["message"]


def test_timeout_fault_does_not_answer_before_the_client_gives_up(upstream):
    client = openai_client(upstream, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model=MODEL, messages=CHAT, extra_body={"demo_fault": "timeout", "demo_delay_ms": 1500}
        )


def test_cut_stream_drops_the_connection_before_the_final_events(upstream):
    body = {"model": MODEL, "messages": CHAT, "stream": True, "demo_fault": "cut_stream"}
    lines = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", f"{upstream.base_url}/chat/completions", json=body) as response,
    ):
        lines.extend(line for line in response.iter_lines() if line)
    assert len(lines) == 2
    assert "data: [DONE]" not in lines


def test_cut_stream_surfaces_as_an_error_in_the_sdk(upstream):
    stream = openai_client(upstream).chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, extra_body={"demo_fault": "cut_stream"}
    )
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        list(stream)


def test_malformed_json_fault_returns_200_json_that_does_not_parse(upstream):
    response = httpx.post(
        f"{upstream.base_url}/chat/completions",
        json={"model": MODEL, "messages": CHAT, "demo_fault": "malformed_json"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_body_without_model_is_rejected_with_400(upstream):
    response = httpx.post(f"{upstream.base_url}/chat/completions", json={"messages": CHAT})
    assert response.status_code == 400


def test_keyed_upstream_rejects_a_wrong_key_with_openai_shaped_401(keyed_upstream):
    with pytest.raises(openai.AuthenticationError) as raised:
        openai_client(keyed_upstream, api_key="sk-wrong").chat.completions.create(
            model=MODEL, messages=CHAT
        )
    assert raised.value.body["code"] == "invalid_api_key"


def test_keyed_upstream_accepts_the_bearer_key(keyed_upstream):
    completion = openai_client(keyed_upstream, api_key=PARTNER_API_KEY).chat.completions.create(
        model=MODEL, messages=CHAT
    )
    assert completion.choices[0].message.content == "echo: hello there"


def test_keyed_upstream_accepts_x_api_key_on_messages(keyed_upstream):
    # The Anthropic SDK authenticates with x-api-key only.
    message = anthropic_client(keyed_upstream, api_key=PARTNER_API_KEY).messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "echo: hi"


def test_keyed_upstream_rejects_x_api_key_outside_messages(keyed_upstream):
    response = httpx.post(
        f"{keyed_upstream.base_url}/chat/completions",
        json={"model": MODEL, "messages": CHAT},
        headers={"x-api-key": PARTNER_API_KEY},
    )
    assert response.status_code == 401


def test_requests_are_recorded_with_lowercased_headers_and_parsed_body(upstream):
    httpx.post(
        f"{upstream.base_url}/chat/completions",
        json={"model": MODEL, "messages": CHAT},
        headers={"Authorization": "Bearer sk-seen", "X-Custom": "1"},
    )
    [record] = upstream.received
    assert record["method"] == "POST"
    assert record["path"] == "/v1/chat/completions"
    assert record["headers"]["authorization"] == "Bearer sk-seen"
    assert record["headers"]["x-custom"] == "1"
    assert record["json"] == {"model": MODEL, "messages": CHAT}


def test_received_endpoint_returns_and_clears_the_record(upstream):
    httpx.post(f"{upstream.base_url}/responses", json={"model": MODEL, "input": "x"})
    root = upstream.base_url.removesuffix("/v1")
    assert [r["path"] for r in httpx.get(f"{root}/__received").json()] == ["/v1/responses"]
    httpx.delete(f"{root}/__received")
    assert httpx.get(f"{root}/__received").json() == []
