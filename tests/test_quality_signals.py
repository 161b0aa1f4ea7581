"""Quality signals end to end: the finish reason of every API's answers, streamed and not,
and the error category of each kind of failure, as the gateway records them on the usage
and attribution rows, and as the report counts them from the rollups the gateway wrote."""

from __future__ import annotations

import json

import httpx
import pytest

from experiments.models import ExperimentRequest
from experiments.reports.report import experiment_report
from gateway.blinding import Blinder, FinishReason, KeyScrubber, checkpoint_identifiers
from gateway.models import GatewayUsage
from gateway.streaming import EventRewriter
from tests.gateway_server import requires_server, wait_for_rows
from tests.gateway_support import active_experiment, wait_listed

CHAT = [{"role": "user", "content": "hello there"}]
BODIES = {
    "/chat/completions": {"messages": CHAT},
    "/responses": {"input": "hello there"},
    "/messages": {"messages": CHAT, "max_tokens": 20},
}
#: The demo upstream's ``demo_finish`` (each API's own words) -> the recorded finish reason.
FINISHES = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}


def _send(gateway, path: str, body: dict, request_id: str, *, stream: bool) -> tuple[int, str]:
    """One request; its status and the whole answer as text (every event of a stream)."""
    headers = {"x-kilo-request": request_id}
    body = {**body, "stream": stream}
    with httpx.stream(
        "POST", gateway.base_url + path, json=body, headers=headers, timeout=15
    ) as response:
        return response.status_code, response.read().decode()


def _rows_by_request_id() -> dict[str, tuple[GatewayUsage, ExperimentRequest]]:
    rows = {}
    for attribution in ExperimentRequest.objects.select_related("usage"):
        rows[attribution.client_request_id] = (attribution.usage, attribution)
    return rows


@requires_server
@pytest.mark.parametrize("path", list(BODIES))
def test_each_finish_reason_of_each_api_is_recorded_streamed_and_not(gateway, upstream, path):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    expected = {}
    for finish, recorded in FINISHES.items():
        for stream in (False, True):
            request_id = f"{finish}-{'stream' if stream else 'body'}"
            body = {**BODIES[path], "model": exp.public_model_id, "demo_finish": finish}
            status, text = _send(gateway, path, body, request_id, stream=stream)
            assert status == 200, text
            if finish == "tool_calls":
                # The tool call reaches the client as the partner sent it.
                assert "lookup" in text
            expected[request_id] = recorded
    wait_for_rows(len(expected), len(expected))
    rows = _rows_by_request_id()
    assert set(rows) == set(expected)
    for request_id, recorded in expected.items():
        usage, attribution = rows[request_id]
        assert (usage.finish_reason, attribution.finish_reason) == (recorded, recorded), request_id
        assert (usage.has_error, usage.error_category, attribution.error_category) == (
            False,
            None,
            None,
        )
        assert usage.is_stream == request_id.endswith("stream")
    # The gateway's writer counted them in the rollups the report reads.
    report = experiment_report(exp)
    counted = {"stop": 0, "length": 0, "tool_calls": 0, "content_filter": 0, "other": 0}
    counted["unknown"] = 0
    for checkpoint in report.checkpoints:
        for name, count in checkpoint.finish_reasons.items():
            counted[name] += count
    assert counted == {**dict.fromkeys(FINISHES.values(), 2), "other": 0, "unknown": 0}
    served = [c for c in report.checkpoints if c.requests]
    assert sum(c.tool_call_rate * c.successes for c in served) == pytest.approx(2)


@requires_server
def test_each_kind_of_failure_gets_its_error_category(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    chat = {"model": exp.public_model_id, "messages": CHAT}
    cases = {
        "ok": ({}, False, None),
        "http-500": ({"demo_fault": "http_500"}, False, "upstream_5xx"),
        "http-429": ({"demo_fault": "http_429"}, False, "rate_limit"),
        "http-400": ({"demo_fault": "http_400"}, False, "bad_request"),
        "wrong-type": ({"messages": "hello"}, False, "bad_request"),
        "malformed": ({"demo_fault": "malformed_json"}, False, "upstream_5xx"),
        "cut": ({"demo_fault": "cut_stream"}, True, "upstream_5xx"),
        "timeout": ({"demo_fault": "timeout", "demo_delay_ms": 8000}, False, "timeout"),
    }
    for request_id, (extra, stream, _) in cases.items():
        _send(gateway, "/chat/completions", {**chat, **extra}, request_id, stream=stream)
    # The client goes away after the first bytes of a slow stream.
    slow = {**chat, "stream": True, "demo_chunks": 50, "demo_chunk_delay_ms": 200}
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        json=slow,
        headers={"x-kilo-request": "gone"},
        timeout=10,
    ) as response:
        next(response.iter_bytes())
    cases["gone"] = ({}, True, "client_disconnect")
    wait_for_rows(len(cases), len(cases))
    rows = _rows_by_request_id()
    for request_id, (_, _, category) in cases.items():
        usage, attribution = rows[request_id]
        assert usage.has_error == (category is not None), request_id
        assert (usage.error_category, attribution.error_category) == (category, category), (
            request_id,
            usage.error_kind,
        )
    # Per checkpoint, from the rollups: the categories of its errors, every one listed.
    report = experiment_report(exp)
    totals: dict[str, int] = {}
    for checkpoint in report.checkpoints:
        assert sum(checkpoint.errors_by_kind.values()) == checkpoint.errors
        for name, count in checkpoint.errors_by_kind.items():
            totals[name] = totals.get(name, 0) + count
    assert totals == {
        "auth": 0,
        "rate_limit": 1,
        "upstream_5xx": 3,
        "timeout": 1,
        "client_disconnect": 1,
        "bad_request": 2,
        "other": 0,
    }


@requires_server
def test_a_partner_refusing_the_key_is_an_auth_error(gateway, keyed_upstream):
    exp = active_experiment(keyed_upstream)  # a key the partner does not accept: 401
    wait_listed(gateway, exp.public_model_id)
    body = {"model": exp.public_model_id, "messages": CHAT, "max_tokens": 5}
    for path in ("/chat/completions", "/messages"):
        response = httpx.post(gateway.base_url + path, json=body, timeout=10)
        assert response.status_code == 401
    wait_for_rows(2, 2)
    assert list(GatewayUsage.objects.values_list("error_category", flat=True)) == ["auth"] * 2
    assert list(ExperimentRequest.objects.values_list("error_category", flat=True)) == ["auth"] * 2


# --- extraction details, on the relay's own parsing ----------------------------------------


def _stream_finish(kind: str, events: list[dict | str]) -> str | None:
    identifiers = checkpoint_identifiers((("http://10.0.0.5:8000/v1", "secret-rc"),))
    blinder = Blinder("kilo/pub", KeyScrubber(""), identifiers, finish=FinishReason.for_kind(kind))
    rewriter = EventRewriter(blinder)
    for event in events:
        payload = event if isinstance(event, str) else json.dumps(event)
        rewriter.event(f"data: {payload}".encode())
    return blinder.finish.normalised


def test_a_chat_answer_with_tool_calls_that_says_stop_counts_as_tool_calls():
    events = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1"}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        "[DONE]",
    ]
    assert _stream_finish("chat_completions", events) == "tool_calls"


def test_the_first_choice_speaks_for_the_answer():
    events = [
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    assert _stream_finish("chat_completions", events) == "stop"


@pytest.mark.parametrize(
    ("kind", "events", "expected"),
    [
        ("chat_completions", [{"choices": [{"finish_reason": "something_new"}]}], "other"),
        ("chat_completions", [{"choices": [{"finish_reason": "function_call"}]}], "tool_calls"),
        ("chat_completions", [{"choices": [{"delta": {"content": "x"}}]}], None),
        ("messages", [{"type": "message_delta", "delta": {"stop_reason": "pause_turn"}}], "other"),
        (
            "messages",
            [{"type": "message_delta", "delta": {"stop_reason": "stop_sequence"}}],
            "stop",
        ),
        ("messages", [{"type": "message_start", "message": {"stop_reason": None}}], None),
        ("responses", [{"type": "response.failed", "response": {"status": "failed"}}], "other"),
        (
            "responses",
            [{"type": "response.created", "response": {"status": "in_progress", "output": []}}],
            None,
        ),
        (
            "responses",
            [
                {
                    "type": "response.incomplete",
                    "response": {"status": "incomplete", "incomplete_details": None},
                }
            ],
            "other",
        ),
    ],
)
def test_finish_reasons_outside_the_usual_words(kind, events, expected):
    assert _stream_finish(kind, events) == expected
