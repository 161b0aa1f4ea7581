"""SSE relay units: event splitting, per-event blinding, the partner key split across events."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.blinding import REDACTED, Blinder, KeyScrubber, checkpoint_identifiers
from gateway.streaming import (
    MAX_HELD_EVENTS,
    MIN_HELD,
    EventRewriter,
    MalformedEvent,
    sse_events,
)

KEY = "sk-canary-7f3c9a1e5b2d4c6a8e0f1a3b5c7d9e1f"
LIMIT = 1024 * 1024


def _collect(chunks, max_event_bytes=LIMIT):
    async def run():
        async def source():
            for chunk in chunks:
                yield chunk

        return [event async for event in sse_events(source(), max_event_bytes=max_event_bytes)]

    return asyncio.run(run())


def test_events_are_split_across_arbitrary_chunk_boundaries():
    stream = b'data: {"a":1}\r\n\r\nevent: x\ndata: {"b":2}\n\n'
    chunks = [stream[i : i + 3] for i in range(0, len(stream), 3)]
    assert _collect(chunks) == [b'data: {"a":1}', b'event: x\ndata: {"b":2}']


def test_a_crlf_split_between_two_chunks_is_one_line_end():
    assert _collect([b'data: {"a":1}\r', b"\n\r", b"\n", b'data: {"b":2}\r\n\r\n']) == [
        b'data: {"a":1}',
        b'data: {"b":2}',
    ]


def test_a_lone_cr_ends_a_line_as_the_sse_spec_says():
    assert _collect([b'data: {"a":1}\r\r']) == [b'data: {"a":1}']


def test_a_trailing_partial_event_is_dropped():
    assert _collect([b'data: {"a":1}\n\ndata: {"b"']) == [b'data: {"a":1}']


def test_an_event_arriving_in_many_small_chunks_is_relayed_whole():
    event = b'data: {"text":"' + b"x" * 200_000 + b'"}'
    chunks = [event[i : i + 7] for i in range(0, len(event), 7)] + [b"\n\n"]
    assert _collect(chunks) == [event]


def test_an_event_growing_past_the_limit_is_malformed_before_it_ends():
    chunks = [b"data: " + b"x" * 600, b"x" * 600]  # never terminated: still refused
    with pytest.raises(MalformedEvent):
        _collect(chunks, max_event_bytes=1000)


def test_a_whole_event_over_the_limit_in_one_chunk_is_malformed():
    with pytest.raises(MalformedEvent):
        _collect([b"data: " + b"x" * 2000 + b"\n\ndata: {}\n\n"], max_event_bytes=1000)


def test_events_up_to_the_limit_pass():
    event = b"data: " + b"x" * 994
    assert _collect([event + b"\n\n"], max_event_bytes=1000) == [event]


def _blinder(key: str = "", public: str = "kilo/pub") -> Blinder:
    identifiers = checkpoint_identifiers((("http://10.0.0.5:8000/v1", "secret-rc"),))
    return Blinder(public, KeyScrubber(key), identifiers)


def _rewriter(key: str = "") -> EventRewriter:
    return EventRewriter(_blinder(key))


def _data(out: bytes) -> list:
    return [
        json.loads(block.split("data: ", 1)[1])
        for block in out.decode().split("\n\n")
        if "data: {" in block
    ]


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


def test_generated_text_naming_the_internal_id_and_host_is_relayed_unchanged():
    raw = b'data: {"choices":[{"delta":{"content":"secret-rc or secret-rc2 at 10.0.0.5:8000"}}]}'
    out = _rewriter(KEY).event(raw) + b""
    assert out == raw + b"\n\n"


def test_data_nested_too_deeply_is_malformed():
    with pytest.raises(MalformedEvent):
        _rewriter(KEY).event(b"data: " + b"[" * 100_000 + b"]" * 100_000)


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
    body = _blinder().body(
        b'{"model":"secret-rc","system_fingerprint":"fp_rc2_cluster_b","choices":[]}'
    )
    assert json.loads(body) == {"model": "kilo/pub", "system_fingerprint": None, "choices": []}


def test_an_error_event_keeps_only_message_type_code_with_checkpoints_named_neutrally():
    out = _rewriter(KEY).event(
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"secret-rc at 10.0.0.5:8000 is busy","param":"' + KEY.encode() + b'"}}'
    )
    assert _data(out) == [
        {
            "type": "error",
            "error": {"message": "kilo/pub at upstream is busy", "type": "overloaded_error"},
        }
    ]


# --- the partner key split across events ------------------------------------------------


def _chat_delta(text: str, index: int = 0) -> bytes:
    chunk = {"choices": [{"index": index, "delta": {"content": text}}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode()


def _run(rewriter: EventRewriter, events: list[bytes]) -> bytes:
    return b"".join(rewriter.event(raw) for raw in events) + rewriter.flush()


def _content(out: bytes, index: int = 0) -> str:
    return "".join(
        choice["delta"]["content"]
        for value in _data(out)
        for choice in value.get("choices", [])
        if choice["index"] == index
    )


def assert_redacted(content: str, expected: str) -> None:
    """``content`` is ``expected`` except that each REDACTED may follow at most the key's
    first MIN_HELD - 1 characters (they went out before the rest could be recognised)."""
    assert KEY not in content
    parts = expected.split(REDACTED)
    pattern = f"(.{{0,{MIN_HELD - 1}}}){re.escape(REDACTED)}".join(map(re.escape, parts))
    match = re.fullmatch(pattern, content)
    assert match, content
    assert all(KEY.startswith(head) for head in match.groups())


@pytest.mark.parametrize("piece", [1, 2, 3, 7, len(KEY) - 1])
def test_a_key_split_across_deltas_never_reaches_the_client(piece):
    text = f"Your key is {KEY}, twice: {KEY}."
    deltas = [_chat_delta(text[i : i + piece]) for i in range(0, len(text), piece)]
    out = _run(_rewriter(KEY), deltas)
    assert KEY not in out.decode()
    assert_redacted(_content(out), f"Your key is {REDACTED}, twice: {REDACTED}.")


def test_a_key_split_after_its_first_characters_is_cut_from_there_on():
    out = _run(_rewriter(KEY), [_chat_delta("key s"), _chat_delta("k"), _chat_delta(KEY[2:])])
    assert _content(out) == f"key sk{REDACTED}"


def test_a_key_split_around_other_events_is_still_caught():
    deltas = [
        _chat_delta("key " + KEY[:10]),
        b'event: ping\ndata: {"type":"ping"}',
        _chat_delta("other choice", index=1),
        _chat_delta(KEY[10:] + " end"),
    ]
    out = _run(_rewriter(KEY), deltas)
    assert KEY not in out.decode()
    assert _content(out) == f"key {REDACTED} end"
    assert _content(out, index=1) == "other choice"


def test_text_that_only_starts_like_the_key_is_relayed_byte_for_byte():
    deltas = [_chat_delta("a " + KEY[:12]), _chat_delta("-not-the-key"), _chat_delta("s")]
    rewriter = _rewriter(KEY)
    out = _run(rewriter, deltas)
    assert out == b"".join(raw + b"\n\n" for raw in deltas)


def test_an_event_ending_with_a_short_start_of_the_key_goes_out_at_once():
    assert _content(_rewriter(KEY).event(_chat_delta("ends with sk"))) == "ends with sk"


def test_an_event_waits_at_most_for_the_next_string_at_its_place():
    rewriter = _rewriter(KEY)
    assert rewriter.event(_chat_delta("ends with sk-")) == b""
    released = rewriter.event(_chat_delta(" and goes on"))
    assert _content(released) == "ends with sk- and goes on"


def test_a_held_event_is_let_go_after_the_bound_of_waiting_events():
    rewriter = _rewriter(KEY)
    assert rewriter.event(_chat_delta("ends with sk-")) == b""
    out = b"".join(rewriter.event(b'data: {"type":"ping"}') for _ in range(MAX_HELD_EVENTS))
    assert out.startswith(_chat_delta("ends with sk-") + b"\n\n")
    # What follows of the key is still cut.
    assert _content(rewriter.event(_chat_delta(KEY[3:]))) == REDACTED


def test_a_json_escaped_key_in_an_event_is_scrubbed():
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"k=' + escaped.encode() + b'"}}]}'
    out = _run(_rewriter(KEY), [raw])
    assert KEY not in out.decode() and _content(out) == f"k={REDACTED}"


def test_the_key_in_an_event_line_or_a_field_name_is_scrubbed():
    raw = f'id: {KEY}\ndata: {{"{KEY}":1}}'.encode()
    assert KEY not in _run(_rewriter(KEY), [raw]).decode()


_fragments = st.lists(
    st.sampled_from(["a", "s", "sk", "sk-", "sk-canary", " ", "x-", KEY[:20], KEY, KEY[5:]]),
    max_size=12,
)


@given(fragments=_fragments, cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40))
def test_any_text_cut_anywhere_comes_out_whole_with_every_key_redacted(fragments, cuts):
    text = "".join(fragments)
    deltas, start = [], 0
    for length in cuts:
        deltas.append(text[start : start + length])
        start += length
    deltas.append(text[start:])
    out = _run(_rewriter(KEY), [_chat_delta(delta) for delta in deltas])
    assert KEY not in out.decode()
    assert_redacted(_content(out), text.replace(KEY, REDACTED))
