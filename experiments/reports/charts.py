"""Server-side SVG charts for the stats page: no JavaScript, no CDN, no network.

Every text that comes from the database is HTML-escaped before it enters the
markup; the result is marked safe only after that.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from experiments.reports.figures import CheckpointStats, SlotStats, TimeSeries

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


def _legend(items: list[tuple[str, str]], x: float, y: float, width: float) -> list[str]:
    """Legend entries laid out left to right, wrapping within ``width``."""
    parts, cursor_x, cursor_y = [], x, y
    for label, colour in items:
        item_width = 22 + 7 * len(label) + 18
        if cursor_x + item_width > x + width and cursor_x > x:
            cursor_x, cursor_y = x, cursor_y + 18
        parts.append(
            f'<rect x="{cursor_x:.1f}" y="{cursor_y - 9:.1f}" width="14" height="10" '
            f'fill="{colour}" rx="2"/><text x="{cursor_x + 19:.1f}" y="{cursor_y:.1f}" '
            f'font-size="12" fill="#333">{escape(label)}</text>'
        )
        cursor_x += item_width
    return parts


def requests_over_time(
    series: TimeSeries, checkpoints: list[CheckpointStats], *, width: int = 900
) -> SafeString:
    """One line per checkpoint; dashed markers where a slot hands over to a new checkpoint."""
    height, left, right, top, bottom = 340, 64, 20, 20, 88
    plot_w, plot_h = width - left - right, height - top - bottom
    colours = checkpoint_colours(checkpoints)
    buckets = series.buckets
    maximum = max((max(v) for v in series.counts.values() if v), default=0)
    ticks = nice_ticks(maximum)
    y_top = ticks[-1]
    start = buckets[0] if buckets else datetime.now()
    end = (buckets[-1] if buckets else start) + timedelta(seconds=series.bucket_seconds)
    span = end - start

    def x_at(moment: datetime) -> float:
        return left + plot_w * (moment - start).total_seconds() / max(span.total_seconds(), 1)

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
    half = timedelta(seconds=series.bucket_seconds / 2)
    for checkpoint in checkpoints:
        counts = series.counts.get(checkpoint.version_id, [])
        if not any(counts):
            continue
        points = " ".join(
            f"{x_at(moment + half):.1f},{y_at(value):.1f}"
            for moment, value in zip(buckets, counts, strict=True)
        )
        body.append(
            f'<polyline points="{points}" fill="none" stroke="{colours[checkpoint.version_id]}" '
            f'stroke-width="2" stroke-linejoin="round" class="mx-series">'
            f"<title>{escape(checkpoint.slot_label)} / {escape(checkpoint.internal_id)}</title>"
            "</polyline>"
        )
    # A hot-swap is the start of any checkpoint that is not its slot's first.
    previous_slot = None
    for checkpoint in checkpoints:
        handover = checkpoint.slot_id == previous_slot
        previous_slot = checkpoint.slot_id
        if not handover or not (start <= checkpoint.effective_from <= end):
            continue
        x = x_at(checkpoint.effective_from)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" '
            f'stroke="{colours[checkpoint.version_id]}" stroke-dasharray="5 4" '
            f'class="mx-handover"/><text x="{x + 4:.1f}" y="{top + 12}" font-size="11" '
            f'fill="#333">hot-swap → {escape(checkpoint.internal_id)}</text>'
        )
    body.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#888"/>'
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="#888"/>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="12" fill="#333" '
        f'text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2:.1f})">'
        f"requests per {_bucket_name(series.bucket_seconds)}</text>"
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 36}" font-size="12" '
        f'fill="#333" text-anchor="middle">time (UTC)</text>'
    )
    body += _legend(
        [(f"{c.slot_label} / {c.internal_id}", colours[c.version_id]) for c in checkpoints],
        left,
        top + plot_h + 60,
        plot_w,
    )
    return _svg(width, height, "Requests over time per checkpoint", body)


def _bucket_name(seconds: int) -> str:
    if seconds % 86400 == 0:
        days = seconds // 86400
        return "day" if days == 1 else f"{days} days"
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return "hour" if hours == 1 else f"{hours} hours"
    minutes = seconds // 60
    return "minute" if minutes == 1 else f"{minutes} minutes"


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
        body.append(
            f'<text x="{centre:.1f}" y="{top + plot_h + 16}" font-size="12" '
            f'text-anchor="middle" fill="#333">{escape(checkpoint.internal_id)}</text>'
            f'<text x="{centre:.1f}" y="{top + plot_h + 31}" font-size="11" '
            f'text-anchor="middle" fill="#777">{escape(checkpoint.slot_label)}</text>'
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
