"""Response capture end to end (SPEC §9): a real gateway process, real partners on loopback.

The gateway stores the answer of a sampled request in the prompt store next to the
request: the text the client received (streamed or not, for the three APIs), tool calls
with their arguments, never the partner key. Which requests are sampled follows from a
hash of the usage id, recomputed here independently of the gateway's code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from experiments import services
from experiments.models import ExperimentRequest
from experiments.prompts.store import LocalPromptStore
from gateway.demo.upstream import _sse, read_body
from tests.gateway_server import GatewayServer, requires_server, wait_for_rows, wait_until
from tests.gateway_support import active_experiment, wait_listed
from tests.hostile_upstream import json_escaped
from tests.upstream import RunningUpstream

pytestmark = requires_server

KINDS = {
    "chat_completions": "/chat/completions",
    "responses": "/responses",
    "messages": "/messages",
}
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = '{"city":"Paris","unit":"celsius"}'


def body_for(kind: str, model: str, text: str, **extra: Any) -> dict[str, Any]:
    if kind == "responses":
        return {"model": model, "input": text, **extra}
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    if kind == "messages":
        body["max_tokens"] = 50
    return body


def sampled(usage_id, basis_points: int) -> bool:
    """SPEC: the first 8 bytes of SHA-256 of the usage id's bytes, modulo 10000."""
    value = int.from_bytes(hashlib.sha256(usage_id.bytes).digest()[:8], "big")
    return value % 10_000 < basis_points


def store_of(gateway: GatewayServer) -> LocalPromptStore:
    return LocalPromptStore(gateway.env["PROMPT_STORE_DIR"])


def stored_answer(gateway: GatewayServer, row: ExperimentRequest) -> dict[str, Any]:
    assert row.response_sha256 and len(row.response_sha256) == 64, row.response_sha256
    return json.loads(store_of(gateway).get_answer(row.response_sha256))


def client_text(kind: str, response: httpx.Response, stream: bool) -> str:
    """The answer text as a client assembles it from what it received."""
    if not stream:
        body = response.json()
        if kind == "chat_completions":
            return body["choices"][0]["message"]["content"]
        if kind == "responses":
            return body["output"][0]["content"][0]["text"]
        return body["content"][0]["text"]
    pieces = []
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if kind == "chat_completions":
            for choice in event.get("choices", []):
                pieces.append(choice.get("delta", {}).get("content") or "")
        elif kind == "responses" and event.get("type") == "response.output_text.delta":
            pieces.append(event["delta"])
        elif kind == "messages" and event.get("type") == "content_block_delta":
            pieces.append(event["delta"].get("text", ""))
    return "".join(pieces)


def post(gateway: GatewayServer, kind: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(gateway.base_url + KINDS[kind], json=body, timeout=15)
    assert response.status_code == 200, response.text
    return response


def rows_newest_first() -> list[ExperimentRequest]:
    return list(ExperimentRequest.objects.order_by("-created_at"))


# --- every API, streamed and not, from the demo upstream --------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_sampled_answer_is_stored_as_the_client_received_it(gateway, upstream, kind, stream):
    experiment = active_experiment(upstream, response_capture_rate=Decimal("100"))
    wait_listed(gateway, experiment.public_model_id)
    prompt = f"Capture me please ({kind}, {'streamed' if stream else 'whole'})"
    body = body_for(kind, experiment.public_model_id, prompt, stream=stream, demo_chunks=5)
    response = post(gateway, kind, body)
    wait_for_rows(1, 1)

    row = ExperimentRequest.objects.get()
    answer = stored_answer(gateway, row)
    assert answer == {"text": f"echo: {prompt}", "tool_calls": [], "truncated": False}
    assert answer["text"] == client_text(kind, response, stream)
    # Next to the request: the prompt of the same row is in the same store.
    assert prompt in store_of(gateway).get(row.request_body_sha256).decode()


# --- tool calls, from a partner that calls a tool ----------------------------------------


def _pieces(text: str, size: int = 4) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _chat(text: str, stream: bool) -> Iterator[tuple[str | None, Any]] | dict:
    if not stream:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "partner-model",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS},
                            }
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5},
        }

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "partner-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def events():
        yield None, chunk({"role": "assistant", "content": ""})
        for piece in _pieces(text):
            yield None, chunk({"content": piece})
        first = {"index": 0, "id": "call_1", "type": "function"}
        yield None, chunk({"tool_calls": [{**first, "function": {"name": TOOL_NAME}}]})
        for piece in _pieces(TOOL_ARGUMENTS):
            yield None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield None, chunk({}, "tool_calls")
        yield None, "[DONE]"

    return events()


def _responses(text: str, stream: bool):
    message = {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": TOOL_NAME,
        "arguments": TOOL_ARGUMENTS,
        "status": "completed",
    }
    done = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "partner-model",
        "output": [message, call],
        "usage": {"input_tokens": 3, "output_tokens": 5},
    }
    if not stream:
        return done

    def events():
        yield "response.created", {"type": "response.created", "response": {**done, "output": []}}
        yield (
            "response.output_item.added",
            {"type": "response.output_item.added", "output_index": 0, "item": message},
        )
        for piece in _pieces(text):
            yield (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                },
            )
        yield (
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "output_index": 1,
                "item": {**call, "arguments": "", "status": "in_progress"},
            },
        )
        for piece in _pieces(TOOL_ARGUMENTS):
            yield (
                "response.function_call_arguments.delta",
                {
                    "type": "response.function_call_arguments.delta",
                    "output_index": 1,
                    "delta": piece,
                },
            )
        yield "response.completed", {"type": "response.completed", "response": done}

    return events()


def _messages(text: str, stream: bool):
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "partner-model",
        "content": [
            {"type": "text", "text": text},
            {
                "type": "tool_use",
                "id": "tu_1",
                "name": TOOL_NAME,
                "input": json.loads(TOOL_ARGUMENTS),
            },
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 3, "output_tokens": 5},
    }
    if not stream:
        return message

    def events():
        yield "message_start", {"type": "message_start", "message": {**message, "content": []}}
        yield (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        for piece in _pieces(text):
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        tool = {"type": "tool_use", "id": "tu_1", "name": TOOL_NAME, "input": {}}
        yield (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": tool},
        )
        for piece in _pieces(TOOL_ARGUMENTS):
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                },
            )
        yield "content_block_stop", {"type": "content_block_stop", "index": 1}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}}
        yield "message_stop", {"type": "message_stop"}

    return events()


SHAPES = {"/chat/completions": _chat, "/responses": _responses, "/messages": _messages}


class ToolCallingPartner:
    """A partner that answers "Checking the weather." and calls ``get_weather``."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = json.loads(await read_body(receive) or b"{}")
        route = next(path for path in SHAPES if scope["path"].endswith(path))
        stream = bool(body.get("stream"))
        shape = SHAPES[route]("Checking the weather.", stream)
        content_type = b"text/event-stream" if stream else b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        if not stream:
            await send({"type": "http.response.body", "body": json.dumps(shape).encode()})
            return
        for event, payload in shape:
            await send(
                {"type": "http.response.body", "body": _sse(event, payload), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def tool_partner() -> Iterator[str]:
    running = RunningUpstream(ToolCallingPartner())
    running.start()
    yield f"http://127.0.0.1:{running.port}/v1"
    running.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_tool_calls_are_stored_with_their_arguments(gateway, tool_partner, kind, stream):
    class Partner:
        base_url = tool_partner

    experiment = active_experiment(Partner, response_capture_rate=Decimal("100"))
    wait_listed(gateway, experiment.public_model_id)
    post(gateway, kind, body_for(kind, experiment.public_model_id, "Weather?", stream=stream))
    wait_for_rows(1, 1)

    answer = stored_answer(gateway, ExperimentRequest.objects.get())
    assert answer == {
        "text": "Checking the weather.",
        "tool_calls": [{"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS}],
        "truncated": False,
    }


# --- sampling ----------------------------------------------------------------------------


def answer_blobs(gateway: GatewayServer) -> set[Path]:
    return {p for p in Path(gateway.env["PROMPT_STORE_DIR"], "a").rglob("*") if p.is_file()}


def test_at_rate_zero_no_answer_is_stored(gateway, upstream):
    experiment = active_experiment(upstream)  # the default rate: 0
    wait_listed(gateway, experiment.public_model_id)
    before = answer_blobs(gateway)
    for index, kind in enumerate(KINDS):
        post(gateway, kind, body_for(kind, experiment.public_model_id, f"q{index}", stream=True))
        post(gateway, kind, body_for(kind, experiment.public_model_id, f"q{index}"))
    wait_for_rows(6, 6)
    assert not ExperimentRequest.objects.filter(response_sha256__isnull=False).exists()
    assert answer_blobs(gateway) == before


def test_a_partial_rate_samples_exactly_the_requests_the_hash_of_their_id_picks(gateway, upstream):
    experiment = active_experiment(upstream, response_capture_rate=Decimal("37.5"))
    wait_listed(gateway, experiment.public_model_id)
    requests = 48
    for index in range(requests):
        kind = list(KINDS)[index % 3]
        body = body_for(
            kind, experiment.public_model_id, f"sampled? {index}", stream=index % 2 == 0
        )
        post(gateway, kind, body)
    wait_for_rows(requests, requests)

    rows = rows_newest_first()
    expected = {row.usage_id: sampled(row.usage_id, 3750) for row in rows}
    captured = {row.usage_id: row.response_sha256 is not None for row in rows}
    assert captured == expected
    # Both outcomes occur (the chance that 48 requests at 37.5% do not is below 1e-9).
    assert 0 < sum(captured.values()) < requests
    for row in rows:
        if row.response_sha256:
            assert stored_answer(gateway, row)["text"].startswith("echo: sampled? ")


def test_a_rate_changed_while_serving_reaches_the_gateway(gateway, upstream):
    experiment = active_experiment(upstream)
    wait_listed(gateway, experiment.public_model_id)
    post(gateway, "chat_completions", body_for("chat_completions", experiment.public_model_id, "x"))
    wait_for_rows(1, 1)
    assert ExperimentRequest.objects.get().response_sha256 is None

    services.update_experiment(experiment=experiment, response_capture_rate="100")

    def next_request_is_captured() -> bool:
        count = ExperimentRequest.objects.count()
        body = body_for("chat_completions", experiment.public_model_id, "after the change")
        post(gateway, "chat_completions", body)
        wait_until(lambda: ExperimentRequest.objects.count() > count, timeout=10)
        return rows_newest_first()[0].response_sha256 is not None

    # Within the routing generation check (GATEWAY_MEMBERSHIP_TTL_SECONDS), not at once.
    wait_until(next_request_is_captured, timeout=15, interval=0.1)


# --- the partner key never lands in the store ---------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path", ["/chat/completions", "/messages"])
def test_a_partner_key_echoed_in_the_answer_is_not_stored(
    gateway, hostile_upstream, canary_key, path, stream
):
    from tests.test_hostile_partner import one_partner_experiment

    experiment = one_partner_experiment(hostile_upstream.base_url("canary"), canary_key)
    services.update_experiment(experiment=experiment, response_capture_rate="100")
    wait_listed(gateway, experiment.public_model_id)
    body = {
        "model": experiment.public_model_id,
        "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 20,
        "stream": stream,
        "hostile": "key_in_stream" if stream else "key_in_completion",
        "piece": 2,
    }
    response = httpx.post(gateway.base_url + path, json=body, timeout=15)
    assert response.status_code == 200
    wait_for_rows(1, 1)

    answer = stored_answer(gateway, ExperimentRequest.objects.get())
    assert "[redacted]" in answer["text"]
    assert canary_key not in answer["text"]
    # Nothing anywhere in the store holds the key, verbatim or JSON-escaped.
    for blob in Path(gateway.env["PROMPT_STORE_DIR"]).rglob("*"):
        if blob.is_file():
            raw = blob.read_bytes()
            assert canary_key.encode() not in raw, blob
            assert json_escaped(canary_key).encode() not in raw, blob
