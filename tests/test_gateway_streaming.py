"""SSE relay units: event splitting and per-event blinding."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.blinding import Blinder
from gateway.routing import Route
from gateway.streaming import EventRewriter, MalformedEvent, sse_events


def _collect(chunks):
    async def run():
        async def source():
            for chunk in chunks:
                yield chunk

        return [event async for event in sse_events(source())]

    return asyncio.run(run())


def test_events_are_split_across_arbitrary_chunk_boundaries():
    stream = b'data: {"a":1}\r\n\r\nevent: x\ndata: {"b":2}\n\n'
    chunks = [stream[i : i + 3] for i in range(0, len(stream), 3)]
    assert _collect(chunks) == [b'data: {"a":1}', b'event: x\ndata: {"b":2}']


def test_a_trailing_partial_event_is_dropped():
    assert _collect([b'data: {"a":1}\n\ndata: {"b"']) == [b'data: {"a":1}']


def _rewriter():
    route = Route(
        public_model_id="kilo/pub",
        base_url="http://10.0.0.5:8000/v1",
        api_key="k",
        internal_id="secret-rc",
        upstream={},
    )
    return EventRewriter(Blinder(route.public_model_id, route.internal_id, route.upstream_texts))


def test_model_fields_are_rewritten_in_anthropic_and_responses_events():
    rewriter = _rewriter()
    start = rewriter.event(
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"secret-rc",'
        b'"usage":{"input_tokens":7,"output_tokens":1}}}'
    )
    assert json.loads(start.decode().split("data: ")[1])["message"]["model"] == "kilo/pub"
    done = rewriter.event(
        b'data: {"type":"response.completed","response":{"model":"secret-rc",'
        b'"usage":{"input_tokens":7,"output_tokens":9}}}'
    )
    assert b"secret-rc" not in done and rewriter.finished
    assert (rewriter.blinder.usage.input_tokens, rewriter.blinder.usage.output_tokens) == (7, 9)


def test_internal_id_and_upstream_host_are_scrubbed_anywhere_in_an_event():
    out = _rewriter().event(b'data: {"id":"x","note":"secret-rc at 10.0.0.5:8000"}')
    assert b"secret-rc" not in out and b"10.0.0.5" not in out


def test_non_json_data_is_malformed():
    with pytest.raises(MalformedEvent):
        _rewriter().event(b"data: {oops")


def test_done_marks_the_openai_stream_finished():
    rewriter = _rewriter()
    assert rewriter.event(b"data: [DONE]") == b"data: [DONE]\n\n"
    assert rewriter.finished


def test_system_fingerprint_is_nulled_in_chat_chunks_and_responses_events():
    rewriter = _rewriter()
    chunk = rewriter.event(
        b'data: {"object":"chat.completion.chunk","model":"secret-rc",'
        b'"system_fingerprint":"fp_rc2_cluster_b","choices":[]}'
    )
    assert b"fp_rc2_cluster_b" not in chunk
    assert json.loads(chunk.decode().split("data: ")[1])["system_fingerprint"] is None
    done = rewriter.event(
        b'data: {"type":"response.completed","response":{"model":"secret-rc",'
        b'"system_fingerprint":"fp_rc2_cluster_b"}}'
    )
    assert b"fp_rc2_cluster_b" not in done


def test_system_fingerprint_is_nulled_in_a_non_streaming_body():
    body = _rewriter().blinder.body(
        b'{"model":"secret-rc","system_fingerprint":"fp_rc2_cluster_b","choices":[]}'
    )
    assert json.loads(body) == {"model": "kilo/pub", "system_fingerprint": None, "choices": []}
