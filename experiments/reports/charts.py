"""Server-side SVG charts for the stats page: no JavaScript, no CDN, no network.

Every text that comes from the database is HTML-escaped before it enters the
markup; the result is marked safe only after that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from experiments.reports.figures import CheckpointStats, SlotStats, TimeSeries, bucket_name

# Okabe–Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
FONT = 'font-family="-apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"'


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """Round tick values from 0 that cover ``maximum`` (1, 2, 2.5 or 5 × 10^n steps)."""
    if maximum <= 0:
        return [0.0, 1.0]
    raw_step = maximum / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    top = math.ceil(maximum / step) * step
    return [i * step for i in range(int(round(top / step)) + 1)]


def _tick_label(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 10_000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _plot_frame(left, top, plot_w, plot_h, ticks, y_at) -> list[str]:
    """The plot area's background and its horizontal grid lines with y-axis labels."""
    body = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa"/>']
    for tick in ticks:
        y = y_at(tick)
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
            f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#555">{_tick_label(tick)}</text>'
        )
    return body


def _time_label(moment: datetime, span: timedelta) -> str:
    if span <= timedelta(days=1):
        return moment.strftime("%H:%M")
    if span <= timedelta(days=14):
        return moment.strftime("%b %d %H:%M")
    return moment.strftime("%Y-%m-%d")


def checkpoint_colours(checkpoints: list[CheckpointStats]) -> dict:
    return {c.version_id: PALETTE[i % len(PALETTE)] for i, c in enumerate(checkpoints)}


def _svg(width: int, height: int, title: str, body: list[str]) -> SafeString:
    return mark_safe(  # noqa: S308 - every dynamic text below went through escape()
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{escape(title)}" class="mx-chart" {FONT}>'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


# --- text boxes ------------------------------------------------------------------
#
# SVG text is measured by the browser, not here, so widths are estimated on the safe
# side (a little wider than Helvetica/Arial/Roboto draw them): boxes laid out with them
# never overlap once drawn. tests/test_chart_layout.py and the stats browser test check
# the drawn boxes.

_NARROW = frozenset("iljtfr.,:;'!|() ")
_WIDE = frozenset("mwMW@%→↻")


def text_width(text: str, font_size: float) -> float:
    """A generous estimate of the drawn width of ``text`` in a sans-serif font."""
    em = 0.0
    for char in text:
        if char in _NARROW:
            em += 0.34
        elif char in _WIDE:
            em += 1.0
        elif char.isupper() or char.isdigit():
            em += 0.68
        else:
            em += 0.6
    return em * font_size


def _fit(text: str, width: float, font_size: float) -> str:
    """``text``, cut with an ellipsis so that it fits in ``width``."""
    if text_width(text, font_size) <= width:
        return text
    while text and text_width(text + "…", font_size) > width:
        text = text[:-1]
    return text + "…"


@dataclass(frozen=True)
class TextBox:
    """A text placed in the chart: its start x, baseline y, and the box it fills."""

    text: str
    x: float
    y: float
    font_size: float

    @property
    def width(self) -> float:
        return text_width(self.text, self.font_size)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom): ascent above the baseline, descent below it."""
        return (
            self.x,
            self.y - self.font_size,
            self.x + self.width,
            self.y + 0.3 * self.font_size,
        )


def boxes_overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


_LEGEND_FONT = 12
_LEGEND_ROW = 18


def _legend_layout(labels: list[str], x: float, width: float) -> list[tuple[float, int]]:
    """(x, row) of each legend entry, left to right, wrapping within ``width``."""
    places, cursor_x, row = [], x, 0
    for label in labels:
        item_width = 19 + text_width(label, _LEGEND_FONT) + 18
        if cursor_x + item_width > x + width and cursor_x > x:
            cursor_x, row = x, row + 1
        places.append((cursor_x, row))
        cursor_x += item_width
    return places


def _legend(items: list[tuple[str, str]], x: float, y: float, width: float) -> list[str]:
    """Legend entries laid out left to right, wrapping within ``width``."""
    labels = [_fit(label, width - 37, _LEGEND_FONT) for label, _ in items]
    parts = []
    for (cursor_x, row), label, (_, colour) in zip(
        _legend_layout(labels, x, width), labels, items, strict=True
    ):
        cursor_y = y + row * _LEGEND_ROW
        parts.append(
            f'<rect x="{cursor_x:.1f}" y="{cursor_y - 9:.1f}" width="14" height="10" '
            f'fill="{colour}" rx="2"/><text x="{cursor_x + 19:.1f}" y="{cursor_y:.1f}" '
            f'font-size="{_LEGEND_FONT}" fill="#333">{escape(label)}</text>'
        )
    return parts


def _legend_rows(items: list[tuple[str, str]], x: float, width: float) -> int:
    labels = [_fit(label, width - 37, _LEGEND_FONT) for label, _ in items]
    return 1 + max((row for _, row in _legend_layout(labels, x, width)), default=0)


# --- requests over time -----------------------------------------------------------

HANDOVER_FONT = 11
HANDOVER_LANE = 16
#: Horizontal room kept free between two hot-swap labels in one lane.
HANDOVER_GAP = 6


@dataclass(frozen=True)
class Handover:
    """A hot-swap (or key rotation) marker: where its line is, and its label."""

    x: float
    lane: int
    label: TextBox
    title: str
    colour: str


def handover_text(checkpoint: CheckpointStats) -> str:
    name = f"{checkpoint.slot_label} {checkpoint.version_name}"
    return f"key rotated → {name}" if checkpoint.key_rotated else f"hot-swap → {name}"


def place_handovers(
    marks: list[tuple[float, str]], left: float, right: float, lanes_top: float
) -> list[tuple[int, TextBox]]:
    """(lane, label) for hot-swap marks at x positions, in the order given.

    Each label sits right of its line, or left of it where the plot ends, and never
    past the plot's edges; a label that would touch another in a lane goes to the
    next lane down. Lanes are rows above the plot, so labels never cover the lines.
    """
    taken: list[list[tuple[float, float]]] = []
    placed: dict[int, tuple[int, TextBox]] = {}
    for index in sorted(range(len(marks)), key=lambda i: marks[i][0]):
        x, text = marks[index]
        text = _fit(text, right - left, HANDOVER_FONT)
        width = text_width(text, HANDOVER_FONT)
        if x + 4 + width <= right:
            start = x + 4
        elif x - 4 - width >= left:
            start = x - 4 - width
        else:
            start = max(left, right - width)
        span = (start - HANDOVER_GAP / 2, start + width + HANDOVER_GAP / 2)
        lane = next(
            (
                number
                for number, spans in enumerate(taken)
                if all(span[1] <= a or b <= span[0] for a, b in spans)
            ),
            len(taken),
        )
        if lane == len(taken):
            taken.append([])
        taken[lane].append(span)
        baseline = lanes_top + (lane + 1) * HANDOVER_LANE - 4
        placed[index] = (lane, TextBox(text, start, baseline, HANDOVER_FONT))
    return [placed[index] for index in range(len(marks))]


def _series_path(
    checkpoint: CheckpointStats, series: TimeSeries, x_at, y_at
) -> tuple[str, list[tuple[datetime, int]]]:
    """Steps over the buckets the checkpoint served in (a gap where it did not): each
    bucket's count is a flat line across the bucket, never a slope between minutes."""
    counts = series.counts.get(checkpoint.version_id, [])
    size = timedelta(seconds=series.bucket_seconds)
    until = checkpoint.effective_until
    commands, drawn, pen_down, last_y = [], [], False, None
    for moment, value in zip(series.buckets, counts, strict=True):
        serving = moment + size > checkpoint.effective_from and (until is None or moment < until)
        if not (serving or value):
            pen_down = False
            continue
        x0, x1, y = x_at(moment), x_at(moment + size), y_at(value)
        if pen_down:
            commands.append(f"V{y:.1f}H{x1:.1f}" if y != last_y else f"H{x1:.1f}")
        else:
            commands.append(f"M{x0:.1f},{y:.1f}H{x1:.1f}")
        pen_down, last_y = True, y
        drawn.append((moment, value))
    return "".join(commands), drawn


def requests_over_time(
    series: TimeSeries, checkpoints: list[CheckpointStats], *, width: int = 900
) -> SafeString:
    """One step line per checkpoint over the buckets it served; a dashed line where a
    slot hands over to a new checkpoint, labelled in lanes above the plot."""
    left, right = 64, 20
    plot_w = width - left - right
    plot_h = 230
    colours = checkpoint_colours(checkpoints)
    buckets = series.buckets
    maximum = max((max(v) for v in series.counts.values() if v), default=0)
    ticks = nice_ticks(maximum)
    y_top = ticks[-1]
    start = buckets[0] if buckets else datetime.now(UTC)
    end = (buckets[-1] if buckets else start) + timedelta(seconds=series.bucket_seconds)
    span = end - start

    def x_at(moment: datetime) -> float:
        return left + plot_w * (moment - start).total_seconds() / max(span.total_seconds(), 1)

    # A hot-swap is the start of any checkpoint that is not its slot's first.
    handovers, previous_slot = [], None
    for checkpoint in checkpoints:
        handover = checkpoint.slot_id == previous_slot
        previous_slot = checkpoint.slot_id
        if handover and start <= checkpoint.effective_from <= end:
            handovers.append(checkpoint)
    lanes_top = 8
    places = place_handovers(
        [(x_at(c.effective_from), handover_text(c)) for c in handovers],
        left,
        left + plot_w,
        lanes_top,
    )
    lanes = 1 + max((lane for lane, _ in places), default=-1)
    top = lanes_top + lanes * HANDOVER_LANE + 12
    legend_items = [(f"{c.label} ({c.internal_id})", colours[c.version_id]) for c in checkpoints]
    legend_y = top + plot_h + 60
    height = int(legend_y + (_legend_rows(legend_items, left, plot_w) - 1) * _LEGEND_ROW + 12)

    def y_at(value: float) -> float:
        return top + plot_h * (1 - value / y_top)

    body = _plot_frame(left, top, plot_w, plot_h, ticks, y_at)
    label_every = max(1, len(buckets) // 8)
    for index, moment in enumerate(buckets):
        if index % label_every:
            continue
        x = x_at(moment)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" '
            f'stroke="#888"/><text x="{x:.1f}" y="{top + plot_h + 18}" font-size="11" '
            f'text-anchor="middle" fill="#555">{_time_label(moment, span)}</text>'
        )
    for checkpoint in checkpoints:
        path, drawn = _series_path(checkpoint, series, x_at, y_at)
        if not any(value for _, value in drawn):
            continue
        body.append(
            f'<path d="{path}" fill="none" stroke="{colours[checkpoint.version_id]}" '
            f'stroke-width="2" stroke-linejoin="miter" class="mx-series">'
            f"<title>{escape(checkpoint.label)} ({escape(checkpoint.internal_id)})</title>"
            "</path>"
        )
    for checkpoint, (lane, label) in zip(handovers, places, strict=True):
        x = x_at(checkpoint.effective_from)
        title = (
            f"{handover_text(checkpoint)} ({checkpoint.internal_id}) at "
            f"{checkpoint.effective_from:%Y-%m-%d %H:%M:%S} UTC"
        )
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{label.y + 3:.1f}" y2="{top + plot_h}" '
            f'stroke="{colours[checkpoint.version_id]}" stroke-dasharray="5 4" '
            f'class="mx-handover"><title>{escape(title)}</title></line>'
            f'<text x="{label.x:.1f}" y="{label.y:.1f}" font-size="{label.font_size}" '
            f'fill="#333" class="mx-handover-label" data-lane="{lane}">{escape(label.text)}'
            f"<title>{escape(title)}</title></text>"
        )
    body.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#888"/>'
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="#888"/>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="12" fill="#333" '
        f'text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2:.1f})">'
        f"requests per {bucket_name(series.bucket_seconds)}</text>"
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 36}" font-size="12" '
        f'fill="#333" text-anchor="middle">time (UTC)</text>'
    )
    body += _legend(legend_items, left, legend_y, plot_w)
    return _svg(width, height, "Requests over time per checkpoint", body)


LATENCY_METRICS = (
    ("TTFB p50", "ttfb_p50", "#56B4E9"),
    ("TTFB p95", "ttfb_p95", "#0072B2"),
    ("total p50", "total_p50", "#E69F00"),
    ("total p95", "total_p95", "#D55E00"),
)


def latency_percentiles(checkpoints: list[CheckpointStats], *, width: int = 900) -> SafeString:
    """Grouped bars: four latency percentiles for each checkpoint with requests."""
    served = [c for c in checkpoints if c.requests]
    height, left, right, top, bottom = 320, 64, 20, 20, 80
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [getattr(c, attr) or 0 for c in served for _, attr, _ in LATENCY_METRICS]
    ticks = nice_ticks(max(values, default=0))
    y_top = ticks[-1]

    def y_at(value: float) -> float:
        return top + plot_h * (1 - value / y_top)

    body = _plot_frame(left, top, plot_w, plot_h, ticks, y_at)
    group_w = plot_w / max(len(served), 1)
    bar_w = min(36.0, group_w * 0.8 / len(LATENCY_METRICS))
    for index, checkpoint in enumerate(served):
        group_x = left + index * group_w + (group_w - bar_w * len(LATENCY_METRICS)) / 2
        for position, (name, attr, colour) in enumerate(LATENCY_METRICS):
            value = getattr(checkpoint, attr)
            if value is None:
                continue
            x = group_x + position * bar_w
            y = y_at(value)
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{top + plot_h - y:.1f}" fill="{colour}" class="mx-bar">'
                f"<title>{escape(checkpoint.internal_id)} {name}: {value:,.0f} ms</title></rect>"
                f'<text x="{x + (bar_w - 2) / 2:.1f}" y="{y - 3:.1f}" font-size="10" '
                f'text-anchor="middle" fill="#333">{value:,.0f}</text>'
            )
        centre = left + index * group_w + group_w / 2
        name = _fit(
            f"{checkpoint.slot_label} {checkpoint.version_name}"
            + (" · key rotated" if checkpoint.key_rotated else ""),
            group_w - 4,
            12,
        )
        internal_id = _fit(checkpoint.internal_id, group_w - 4, 11)
        body.append(
            f'<text x="{centre:.1f}" y="{top + plot_h + 16}" font-size="12" '
            f'text-anchor="middle" fill="#333">{escape(name)}</text>'
            f'<text x="{centre:.1f}" y="{top + plot_h + 31}" font-size="11" '
            f'text-anchor="middle" fill="#777">{escape(internal_id)}</text>'
        )
    body.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#888"/>'
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="#888"/>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="12" fill="#333" '
        f'text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2:.1f})">'
        "milliseconds</text>"
    )
    body += _legend(
        [(name, colour) for name, _, colour in LATENCY_METRICS], left, top + plot_h + 58, plot_w
    )
    return _svg(width, height, "Latency percentiles per checkpoint", body)


def observed_vs_configured_share(slots: list[SlotStats], *, width: int = 900) -> SafeString:
    """Per slot, the configured share of subjects next to the observed one."""
    row_h, left, right, top = 46, 150, 60, 16
    plot_w = width - left - right
    height = top + row_h * max(len(slots), 1) + 64
    body = []
    for tick in range(0, 101, 20):
        x = left + plot_w * tick / 100
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + row_h * len(slots)}" '
            f'stroke="#e3e3e3"/><text x="{x:.1f}" y="{top + row_h * len(slots) + 16}" '
            f'font-size="11" text-anchor="middle" fill="#555">{tick}%</text>'
        )
    for index, slot in enumerate(slots):
        y = top + index * row_h
        body.append(
            f'<text x="{left - 10}" y="{y + 22}" font-size="12" text-anchor="end" '
            f'fill="#333">{escape(slot.label)}</text>'
        )
        bars = [("configured", slot.expected_share, "#999999", y + 6)]
        if slot.observed_share is not None:
            bars.append(("observed", slot.observed_share, "#0072B2", y + 22))
        for name, share, colour, bar_y in bars:
            bar_w = plot_w * share
            body.append(
                f'<rect x="{left}" y="{bar_y}" width="{bar_w:.1f}" height="14" fill="{colour}" '
                f'class="mx-bar"><title>{escape(slot.label)} {name}: {share:.1%}</title></rect>'
                f'<text x="{left + bar_w + 5:.1f}" y="{bar_y + 11}" font-size="11" '
                f'fill="#333">{share:.1%}</text>'
            )
    body.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{top + row_h * len(slots) + 34}" '
        'font-size="12" text-anchor="middle" fill="#333">share of distinct subjects</text>'
    )
    body += _legend(
        [("configured (weights)", "#999999"), ("observed", "#0072B2")],
        left,
        top + row_h * len(slots) + 54,
        plot_w,
    )
    return _svg(width, height, "Observed vs configured share per slot", body)
