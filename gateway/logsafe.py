"""Client-controlled text in log lines: escaped and capped, so that a request can neither forge
a log line (newlines, terminal escapes) nor make one arbitrarily long."""

from __future__ import annotations

#: Characters of a client-controlled value kept in a log line.
MAX_LOGGED_CHARS = 120


def loggable(value: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """``repr`` of at most ``limit`` characters of ``value``, saying how many were cut."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value) - limit} more characters)"
