"""Quality signals per request (SPEC §10): the error category and the finish reason.

Both are stored on the usage row and copied onto the attribution row, so reports count
them from the rollups and anyone can recount them from the raw rows.

* ``error_category(status, error_kind)``: one of ``ERROR_CATEGORIES``, the categories a
  person reads, derived exactly from the recorded status and error kind (the writer
  computes it as it builds the rows; the kinds are the gateway's ``error_kind`` names).
* ``FINISH_REASONS``: why a successful answer ended, normalised across the three APIs
  (chat completions ``finish_reason``, Responses ``status`` and
  ``incomplete_details.reason``, Anthropic ``stop_reason``); the gateway extracts it from
  bodies and streams (gateway.blinding.FinishReason) with the ``*_FINISH`` maps here.
"""

from __future__ import annotations

#: Error categories, in the order reports show them.
AUTH = "auth"
RATE_LIMIT = "rate_limit"
UPSTREAM_5XX = "upstream_5xx"
TIMEOUT = "timeout"
CLIENT_DISCONNECT = "client_disconnect"
BAD_REQUEST = "bad_request"
OTHER = "other"
ERROR_CATEGORIES = (
    AUTH,
    RATE_LIMIT,
    UPSTREAM_5XX,
    TIMEOUT,
    CLIENT_DISCONNECT,
    BAD_REQUEST,
    OTHER,
)
ERROR_CATEGORY_LABELS = {
    AUTH: "auth",
    RATE_LIMIT: "rate limit",
    UPSTREAM_5XX: "upstream 5xx",
    TIMEOUT: "timeout",
    CLIENT_DISCONNECT: "client disconnect",
    BAD_REQUEST: "bad request",
    OTHER: "other",
}
#: What each category holds, for the notes of the page and the exports.
ERROR_CATEGORY_MEANING = (
    "auth: the partner answered 401 or 403; rate limit: 429; upstream 5xx: the partner "
    "answered 5xx, or failed in a way the gateway answers 502 (unreachable, a malformed or "
    "cut-off response, an error event mid-stream); timeout: the partner did not answer in "
    "time (or answered 408); client disconnect: the client went away before the answer "
    "was complete; bad request: the partner answered 400, 413 or 422, or the gateway "
    "refused the body (400); other: anything else (gateway-internal errors, other 4xx)."
)

#: error_kind of an upstream HTTP error: this prefix and the status (gateway.views).
UPSTREAM_HTTP_PREFIX = "upstream_http_"
#: Gateway error kinds (gateway.errors, gateway.views) and their category.
_KIND_CATEGORIES = {
    "upstream_unreachable": UPSTREAM_5XX,
    "upstream_malformed": UPSTREAM_5XX,
    "upstream_stream_cut": UPSTREAM_5XX,
    "upstream_too_large": UPSTREAM_5XX,
    "upstream_stream_error": UPSTREAM_5XX,
    "upstream_timeout": TIMEOUT,
    "client_disconnected": CLIENT_DISCONNECT,
}
_UPSTREAM_STATUS_CATEGORIES = {
    401: AUTH,
    403: AUTH,
    429: RATE_LIMIT,
    408: TIMEOUT,
    400: BAD_REQUEST,
    413: BAD_REQUEST,
    422: BAD_REQUEST,
}


def error_category(status_code: int, has_error: bool, error_kind: str | None) -> str | None:
    """The category of a failed request; None for a request without error."""
    if not has_error:
        return None
    kind = error_kind or ""
    category = _KIND_CATEGORIES.get(kind)
    if category is not None:
        return category
    if kind.startswith(UPSTREAM_HTTP_PREFIX):
        if 500 <= status_code < 600:
            return UPSTREAM_5XX
        return _UPSTREAM_STATUS_CATEGORIES.get(status_code, OTHER)
    if status_code == 400:
        return BAD_REQUEST  # the gateway's own refusals of a routed body
    return OTHER


#: Finish reasons, in the order reports show them (``unknown``: none was reported).
STOP = "stop"
LENGTH = "length"
TOOL_CALLS = "tool_calls"
CONTENT_FILTER = "content_filter"
FINISH_REASONS = (STOP, LENGTH, TOOL_CALLS, CONTENT_FILTER, OTHER)
FINISH_REASON_LABELS = {
    STOP: "stop",
    LENGTH: "length",
    TOOL_CALLS: "tool calls",
    CONTENT_FILTER: "content filter",
    OTHER: "other",
    "unknown": "unknown",
}
FINISH_REASON_MEANING = (
    "Finish reasons count successful answers: stop (chat stop, Responses completed, "
    "Anthropic end_turn or stop_sequence), length (chat length, Responses incomplete for "
    "max_output_tokens, Anthropic max_tokens), tool calls (chat tool_calls, a Responses "
    "function call, Anthropic tool_use), content filter (chat content_filter, Responses "
    "incomplete for content_filter, Anthropic refusal), other (any other reason), unknown "
    "(the answer reported none). Tool-call rate: tool calls / successful answers."
)

#: Chat completions ``finish_reason`` → finish reason (anything else: other).
CHAT_FINISH = {
    "stop": STOP,
    "length": LENGTH,
    "tool_calls": TOOL_CALLS,
    "function_call": TOOL_CALLS,
    "content_filter": CONTENT_FILTER,
}
#: Anthropic ``stop_reason`` → finish reason (anything else: other).
ANTHROPIC_FINISH = {
    "end_turn": STOP,
    "stop_sequence": STOP,
    "max_tokens": LENGTH,
    "model_context_window_exceeded": LENGTH,
    "tool_use": TOOL_CALLS,
    "refusal": CONTENT_FILTER,
}
#: Responses ``incomplete_details.reason`` → finish reason (anything else: other).
RESPONSES_INCOMPLETE = {"max_output_tokens": LENGTH, "content_filter": CONTENT_FILTER}
#: Responses output items that are calls the client is to make.
RESPONSES_TOOL_CALL_ITEMS = frozenset({"function_call", "custom_tool_call"})


def responses_finish(response: dict) -> str | None:
    """The finish reason of a Responses API response object (a body or the ``response`` of
    a terminal stream event); None while it is not finished."""
    status = response.get("status")
    if status == "completed":
        output = response.get("output")
        if type(output) is list:
            for item in output:
                if type(item) is dict and item.get("type") in RESPONSES_TOOL_CALL_ITEMS:
                    return TOOL_CALLS
        return STOP
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if type(details) is dict else None
        return RESPONSES_INCOMPLETE.get(reason, OTHER) if type(reason) is str else OTHER
    if type(status) is str and status not in ("in_progress", "queued"):
        return OTHER  # failed, cancelled
    return None
