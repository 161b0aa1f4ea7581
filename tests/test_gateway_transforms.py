"""SPEC §5 request transforms, one rule per test."""

from __future__ import annotations

from experiments.models import RequestKind
from gateway.transforms import transform_body

CHAT = RequestKind.CHAT_COMPLETIONS


def test_remove_from_body_runs_before_extra_body():
    body = {"model": "pub", "temperature": 1, "top_p": 0.5}
    out = transform_body(
        body,
        {"remove_from_body": ["temperature", "top_p"], "extra_body": {"top_p": 0.9}},
        internal_id="rc1",
        kind=CHAT,
    )
    assert "temperature" not in out and out["top_p"] == 0.9


def test_extra_body_is_a_shallow_merge():
    body = {"model": "pub", "metadata": {"a": 1}}
    out = transform_body(body, {"extra_body": {"metadata": {"b": 2}}}, internal_id="rc1", kind=CHAT)
    assert out["metadata"] == {"b": 2}


def test_model_is_set_to_internal_id_last_even_over_extra_body():
    out = transform_body(
        {"model": "pub"}, {"extra_body": {"model": "sneaky"}}, internal_id="rc1", kind=CHAT
    )
    assert out["model"] == "rc1"


def test_client_body_is_not_modified():
    body = {"model": "pub", "messages": [{"role": "system", "content": "s"}]}
    transform_body(body, {"add_cache_breakpoints": True}, internal_id="rc1", kind=CHAT)
    assert body == {"model": "pub", "messages": [{"role": "system", "content": "s"}]}


def test_cached_extra_body_is_never_mutated_through_the_request():
    upstream = {"extra_body": {"messages": [{"role": "system", "content": "s"}]}}
    out = transform_body(
        {"model": "p"}, {**upstream, "add_cache_breakpoints": True}, internal_id="r", kind=CHAT
    )
    assert out["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert upstream["extra_body"]["messages"][0]["content"] == "s"


def _marked(message) -> bool:
    content = message["content"]
    return isinstance(content, list) and content[-1].get("cache_control") == {"type": "ephemeral"}


def test_cache_breakpoints_mark_system_last_user_and_user_before_last_assistant():
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a1"},
        {
            "role": "tool",
            "content": [{"type": "text", "text": "t1"}, {"type": "text", "text": "t"}],
        },
    ]
    out = transform_body(
        {"model": "p", "messages": messages},
        {"add_cache_breakpoints": True},
        internal_id="r",
        kind=CHAT,
    )["messages"]
    assert [_marked(m) for m in out] == [True, False, True, False, True]
    assert out[0]["content"] == [
        {"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}
    ]
    assert "cache_control" not in out[4]["content"][0]


def test_cache_breakpoints_skip_when_system_already_has_cache_control():
    messages = [
        {"role": "system", "content": "sys", "cache_control": {"type": "ephemeral"}},
        {"role": "user", "content": "u1"},
    ]
    out = transform_body(
        {"model": "p", "messages": messages},
        {"add_cache_breakpoints": True},
        internal_id="r",
        kind=CHAT,
    )["messages"]
    assert out[1]["content"] == "u1"


def test_cache_breakpoints_need_a_system_message():
    messages = [{"role": "user", "content": "u1"}]
    out = transform_body(
        {"model": "p", "messages": messages},
        {"add_cache_breakpoints": True},
        internal_id="r",
        kind=CHAT,
    )["messages"]
    assert out == messages


def test_reasoning_is_folded_into_string_content_and_fields_dropped():
    messages = [
        {
            "role": "assistant",
            "content": "answer",
            "reasoning": "because",
            "reasoning_content": "other",
            "reasoning_details": [{"x": 1}],
        }
    ]
    out = transform_body(
        {"model": "p", "messages": messages},
        {"inject_reasoning_into_content": True},
        internal_id="r",
        kind=CHAT,
    )["messages"]
    assert out == [{"role": "assistant", "content": "<think>because</think>answer"}]


def test_reasoning_content_is_used_when_reasoning_is_absent_and_list_content_gets_a_first_part():
    messages = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "answer"}],
            "reasoning_content": "why",
        }
    ]
    out = transform_body(
        {"model": "p", "messages": messages},
        {"inject_reasoning_into_content": True},
        internal_id="r",
        kind=CHAT,
    )["messages"]
    assert out[0]["content"] == [
        {"type": "text", "text": "<think>why</think>"},
        {"type": "text", "text": "answer"},
    ]
    assert "reasoning_content" not in out[0]


def test_chat_only_flags_do_not_touch_other_shapes():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    out = transform_body(
        {"model": "p", "messages": messages},
        {"add_cache_breakpoints": True},
        internal_id="r",
        kind=RequestKind.MESSAGES,
    )
    assert out["messages"] == messages
