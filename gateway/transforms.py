"""Request transforms of SPEC §5, applied in this order:

1. delete the ``remove_from_body`` keys;
2. shallow-merge ``extra_body``;
3. set ``model`` to ``internal_id``;
4. chat completions only: cache breakpoints, then reasoning injection.
"""

from __future__ import annotations

import copy
from typing import Any

from experiments.models import RequestKind

EPHEMERAL = {"type": "ephemeral"}
USER_OR_TOOL = ("user", "tool")


def transform_body(
    body: dict[str, Any], upstream: dict[str, Any], *, internal_id: str | None, kind: str
) -> dict[str, Any]:
    """Return the body to send upstream (the client's body is not modified)."""
    out = dict(body)
    for key in upstream.get("remove_from_body") or ():
        out.pop(key, None)
    for key, value in (upstream.get("extra_body") or {}).items():
        # Deep copy: the routing payload is cached and must never be mutated later.
        out[key] = copy.deepcopy(value)
    if internal_id is not None:
        out["model"] = internal_id
    if kind == RequestKind.CHAT_COMPLETIONS and isinstance(out.get("messages"), list):
        needs_breakpoints = upstream.get("add_cache_breakpoints") is True
        needs_reasoning = upstream.get("inject_reasoning_into_content") is True
        if needs_breakpoints or needs_reasoning:
            out["messages"] = [dict(m) if isinstance(m, dict) else m for m in out["messages"]]
        if needs_breakpoints:
            add_cache_breakpoints(out["messages"])
        if needs_reasoning:
            inject_reasoning(out["messages"])
    return out


def _has_cache_control(message: dict[str, Any]) -> bool:
    if "cache_control" in message:
        return True
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(part, dict) and "cache_control" in part for part in content
    )


def _mark(message: dict[str, Any]) -> None:
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = [{"type": "text", "text": content, "cache_control": dict(EPHEMERAL)}]
    elif isinstance(content, list) and content and isinstance(content[-1], dict):
        parts = list(content)
        parts[-1] = {**parts[-1], "cache_control": dict(EPHEMERAL)}
        message["content"] = parts


def _last_index(messages: list[Any], roles: tuple[str, ...], before: int | None = None) -> int:
    stop = len(messages) if before is None else before
    for index in range(stop - 1, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and message.get("role") in roles:
            return index
    return -1


def add_cache_breakpoints(messages: list[Any]) -> None:
    """Mark system, last user/tool, and last user/tool before the last assistant message."""
    system = next(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "system"),
        -1,
    )
    if system < 0 or _has_cache_control(messages[system]):
        return
    targets = [system, _last_index(messages, USER_OR_TOOL)]
    last_assistant = _last_index(messages, ("assistant",))
    if last_assistant >= 0:
        targets.append(_last_index(messages, USER_OR_TOOL, before=last_assistant))
    for index in sorted({t for t in targets if t >= 0}):
        _mark(messages[index])


def inject_reasoning(messages: list[Any]) -> None:
    """Fold assistant reasoning into content as ``<think>…</think>``; drop reasoning fields."""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        reasoning = message.get("reasoning")
        if not isinstance(reasoning, str):
            reasoning = message.get("reasoning_content")
        if not isinstance(reasoning, str):
            continue
        think = f"<think>{reasoning}</think>"
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [{"type": "text", "text": think}, *content]
        elif isinstance(content, str):
            message["content"] = think + content
        else:
            message["content"] = think
        for field in ("reasoning", "reasoning_content", "reasoning_details"):
            message.pop(field, None)
