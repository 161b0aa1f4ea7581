"""A progress bar for long management commands, drawn on stderr so stdout stays data."""

from __future__ import annotations

from collections.abc import Callable

from django.core.management.base import OutputWrapper

BAR_WIDTH = 30

#: (phase, done, total)
ProgressCallback = Callable[[str, int, int], None]


def progress_bar(stream: OutputWrapper) -> ProgressCallback:
    """A callback that redraws ``phase [####....] done/total`` in place, only when the
    bar moves, and ends the line when a phase is done."""
    last_drawn: dict[str, int] = {}

    def draw(phase: str, done: int, total: int) -> None:
        filled = BAR_WIDTH * done // total if total else BAR_WIDTH
        if last_drawn.get(phase) == filled and done != total:
            return
        last_drawn[phase] = filled
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        ending = "\n" if done == total else ""
        stream.write(f"\r{phase:<6} [{bar}] {done:,}/{total:,}", ending=ending, style_func=str)

    return draw
