"""The gateway end to end: a real uvicorn server, the demo upstream, the official SDKs."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from experiments.models import AllocationSubject, VariantVersion
from gateway.models import GatewayUsage
from gateway.tokens import create_token
from tests.factories import UserFactory
from tests.gateway_server import requires_server, wait_for_rows
from tests.gateway_support import (
    active_experiment,
    wait_listed,
)

pytestmark = requires_server

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def token():
    _, plaintext = create_token(user=UserFactory(username="alice"))
    return plaintext


def test_openai_sdk_chat_non_streaming_is_routed_and_blinded(gateway, upstream, token):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=token)
    completion = client.chat.completions.create(model=exp.public_model_id, messages=CHAT)
    assert completion.model == exp.public_model_id
    assert completion.choices[0].message.content
    sent = upstream.received[-1]
    assert sent["json"]["model"].startswith("secret-rc-")
    assert sent["headers"]["authorization"] == "Bearer sk-test-partner-key"
    assert token not in str(sent["headers"])
    wait_for_rows(1, 1)
    usage = GatewayUsage.objects.get()
    assert (usage.status_code, usage.is_stream, usage.has_error) == (200, False, False)
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.experiment_request.allocation_subject == AllocationSubject.USER


def _client(gateway, token):
    return openai.OpenAI(base_url=gateway.base_url, api_key=token, max_retries=0)


def _anthropic(gateway, token):
    return anthropic.Anthropic(base_url=gateway.base, api_key=token, max_retries=0)


def _secrets(exp, upstream) -> list[str]:
    """Everything a client must never see for this experiment."""
    found = [upstream.host_port, str(exp.pk)]
    for variant in exp.variants.all():
        found += [str(variant.pk), variant.label]
        for version in variant.versions.all():
            found += [str(version.pk), version.internal_id]
    return found


def _assert_blind(text: str, exp, upstream) -> None:
    for secret in _secrets(exp, upstream):
        assert secret not in text, secret


def test_openai_sdk_chat_streaming_rewrites_model_in_every_chunk(gateway, upstream, token):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    stream = _client(gateway, token).chat.completions.create(
        model=exp.public_model_id, messages=CHAT, stream=True
    )
    chunks = list(stream)
    assert chunks and all(chunk.model == exp.public_model_id for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    wait_for_rows(1, 1)
    usage = GatewayUsage.objects.get()
    assert usage.is_stream and not usage.has_error
    assert usage.output_tokens > 0 and usage.ttfb_ms is not None


def test_openai_sdk_responses_streaming_and_not(gateway, upstream, token):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    client = _client(gateway, token)
    response = client.responses.create(model=exp.public_model_id, input="hi there")
    assert response.model == exp.public_model_id and response.output_text
    events = list(client.responses.create(model=exp.public_model_id, input="hi", stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.model == exp.public_model_id
    wait_for_rows(2, 2)
    assert all(u.output_tokens > 0 for u in GatewayUsage.objects.all())


def test_anthropic_sdk_messages_streaming_and_not(gateway, upstream, token):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    client = _anthropic(gateway, token)
    message = client.messages.create(model=exp.public_model_id, max_tokens=50, messages=CHAT)
    assert message.model == exp.public_model_id and message.content[0].text
    sent = upstream.received[-1]["headers"]
    assert sent["x-api-key"] == "sk-test-partner-key"
    assert sent["anthropic-version"]
    with client.messages.stream(model=exp.public_model_id, max_tokens=50, messages=CHAT) as stream:
        final = stream.get_final_message()
    assert final.model == exp.public_model_id
    wait_for_rows(2, 2)
    usages = list(GatewayUsage.objects.order_by("created_at"))
    assert [u.is_stream for u in usages] == [False, True]
    assert all(u.input_tokens > 0 and u.output_tokens > 0 for u in usages)


def _sse_text(gateway, path, body, headers=None) -> tuple[httpx.Headers, str]:
    with httpx.stream(
        "POST", gateway.base_url + path, json=body, headers=headers or {}, timeout=10
    ) as response:
        return response.headers, response.read().decode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"messages": CHAT}),
        ("/responses", {"input": "hello"}),
        ("/messages", {"messages": CHAT, "max_tokens": 20}),
    ],
)
def test_blinding_of_headers_and_every_sse_event(gateway, upstream, path, body):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    headers, text = _sse_text(gateway, path, {**body, "model": exp.public_model_id, "stream": True})
    events = [e for e in text.split("\n\n") if e.strip()]
    assert len(events) >= 3
    assert upstream.received[-1]["json"]["model"] in [
        v.internal_id for v in VariantVersion.objects.all()
    ]
    _assert_blind(text, exp, upstream)
    header_text = "\n".join(f"{k}: {v}" for k, v in headers.items())
    _assert_blind(header_text, exp, upstream)
    for partner_header in ("x-upstream-model", "x-upstream-host", "openai-organization"):
        assert partner_header not in headers
    assert headers.get("server") != "demo-upstream"


def test_blinding_of_non_streaming_body_and_headers(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": exp.public_model_id, "messages": CHAT},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["model"] == exp.public_model_id
    _assert_blind(response.text, exp, upstream)
    _assert_blind("\n".join(f"{k}: {v}" for k, v in response.headers.items()), exp, upstream)


@pytest.mark.parametrize(("fault", "status"), [("http_500", 500), ("http_429", 429)])
def test_upstream_http_error_passes_status_blinded_and_writes_rows(
    gateway, upstream, fault, status
):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": exp.public_model_id, "messages": CHAT, "demo_fault": fault},
        timeout=10,
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"]
    _assert_blind(response.text, exp, upstream)
    _assert_blind("\n".join(f"{k}: {v}" for k, v in response.headers.items()), exp, upstream)
    wait_for_rows(1, 1)
    usage = GatewayUsage.objects.get()
    assert (usage.status_code, usage.has_error, usage.error_kind) == (
        status,
        True,
        f"upstream_http_{status}",
    )


def test_anthropic_error_body_keeps_anthropic_shape_blinded(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = httpx.post(
        gateway.base_url + "/messages",
        json={
            "model": exp.public_model_id,
            "messages": CHAT,
            "max_tokens": 5,
            "demo_fault": "http_500",
        },
        timeout=10,
    )
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "api_error"
    _assert_blind(response.text, exp, upstream)


def _post(gateway, body, path="/chat/completions", **kwargs):
    return httpx.post(gateway.base_url + path, json=body, timeout=15, **kwargs)


def _assert_openai_error(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code


def test_connection_refused_is_502_with_rows(gateway, upstream):
    exp = make_unreachable_experiment()
    wait_listed(gateway, exp.public_model_id)
    response = _post(gateway, {"model": exp.public_model_id, "messages": CHAT})
    _assert_openai_error(response, 502, "upstream_unreachable")
    wait_for_rows(1, 1)
    assert GatewayUsage.objects.get().error_kind == "upstream_unreachable"


def make_unreachable_experiment():
    from experiments import services
    from experiments.models import ExperimentStatus
    from tests.factories import make_experiment
    from tests.gateway_server import free_port

    exp = make_experiment(
        status=ExperimentStatus.DRAFT, base_url=f"http://127.0.0.1:{free_port()}/v1"
    )
    services.activate(experiment=exp)
    return exp


def test_upstream_timeout_is_504_with_rows(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    body = {
        "model": exp.public_model_id,
        "messages": CHAT,
        "demo_fault": "timeout",
        "demo_delay_ms": 8000,
    }
    _assert_openai_error(_post(gateway, body), 504, "upstream_timeout")
    wait_for_rows(1, 1)
    assert GatewayUsage.objects.get().error_kind == "upstream_timeout"


def test_malformed_upstream_json_is_502_with_rows(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    body = {"model": exp.public_model_id, "messages": CHAT, "demo_fault": "malformed_json"}
    response = _post(gateway, body)
    _assert_openai_error(response, 502, "upstream_malformed")
    _assert_blind(response.text, exp, upstream)
    wait_for_rows(1, 1)
    assert GatewayUsage.objects.get().error_kind == "upstream_malformed"


def test_cut_stream_ends_openai_stream_with_error_event(gateway, upstream, token):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    stream = _client(gateway, token).chat.completions.create(
        model=exp.public_model_id,
        messages=CHAT,
        stream=True,
        extra_body={"demo_fault": "cut_stream"},
    )
    with pytest.raises(openai.APIError):
        list(stream)
    wait_for_rows(1, 1)
    usage = GatewayUsage.objects.get()
    assert (usage.status_code, usage.error_kind) == (200, "upstream_stream_cut")


def test_cut_stream_ends_anthropic_stream_with_error_event(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    _, text = _sse_text(
        gateway,
        "/messages",
        {
            "model": exp.public_model_id,
            "messages": CHAT,
            "max_tokens": 9,
            "stream": True,
            "demo_fault": "cut_stream",
        },
    )
    last = [e for e in text.split("\n\n") if e.strip()][-1]
    assert last.startswith("event: error\ndata: ")
    _assert_blind(text, exp, upstream)
    wait_for_rows(1, 1)


def test_client_disconnect_mid_stream_still_writes_rows(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    body = {
        "model": exp.public_model_id,
        "messages": CHAT,
        "stream": True,
        "demo_chunks": 50,
        "demo_chunk_delay_ms": 200,
    }
    with httpx.stream(
        "POST", gateway.base_url + "/chat/completions", json=body, timeout=10
    ) as response:
        next(response.iter_bytes())
    wait_for_rows(1, 1)
    usage = GatewayUsage.objects.get()
    assert (usage.status_code, usage.error_kind) == (499, "client_disconnected")


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'{"messages": []}', "invalid_model"),
        (b'{"model": "", "messages": []}', "invalid_model"),
    ],
)
def test_body_without_a_model_is_400_and_writes_nothing(gateway, content, code):
    response = httpx.post(gateway.base_url + "/chat/completions", content=content, timeout=5)
    _assert_openai_error(response, 400, code)
    assert GatewayUsage.objects.count() == 0


@pytest.mark.parametrize(
    "extra",
    [{"messages": "hello"}, {"messages": CHAT, "stream": "yes"}],
)
def test_wrong_types_are_400_with_rows_and_no_upstream_call(gateway, upstream, extra):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    response = _post(gateway, {"model": exp.public_model_id, **extra})
    _assert_openai_error(response, 400, "invalid_type")
    assert upstream.received == []
    wait_for_rows(1, 1)


def test_oversized_body_is_400(gateway_factory, transactional_db):
    small = gateway_factory(GATEWAY_MAX_BODY_BYTES="2000")
    body = {"model": "kilo/x", "messages": [{"role": "user", "content": "x" * 5000}]}
    _assert_openai_error(_post(small, body), 400, "too_large")
