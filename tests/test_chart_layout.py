"""The stats page's SVG charts: bucket sizes, step lines, and hot-swap labels whose
boxes never overlap and never leave the chart (no database needed)."""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from itertools import combinations

import pytest

from experiments.reports import charts
from experiments.reports.charts import (
    HANDOVER_FONT,
    TextBox,
    boxes_overlap,
    place_handovers,
    requests_over_time,
    text_width,
)
from experiments.reports.figures import CheckpointStats, TimeSeries, bucket_seconds_for

SVG = "{http://www.w3.org/2000/svg}"
START = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("span", "size"),
    [
        (timedelta(minutes=30), 60),
        (timedelta(hours=6), 5 * 60),
        (timedelta(days=2), 3600),
        (timedelta(days=7), 3 * 3600),
        (timedelta(days=30), 6 * 3600),
        (timedelta(days=90), 86400),
    ],
)
def test_a_window_of_days_is_drawn_in_hour_or_day_buckets(span, size):
    assert bucket_seconds_for(span) == size


def test_laid_out_labels_of_crowded_hot_swaps_never_overlap_or_leave_the_plot():
    left, right = 64.0, 880.0
    marks = [(70.0 + 3 * i, f"hot-swap → slot-{i} v{i + 2}") for i in range(8)]
    marks += [(878.0, "key rotated → a-rather-long-slot-label v12.3"), (64.0, "hot-swap → w v2")]
    marks += [(500.0, "hot-swap → " + "W" * 200)]  # wider than the plot: cut to fit
    placed = place_handovers(marks, left, right, lanes_top=8)
    boxes = [label.box for _, label in placed]
    for a, b in combinations(boxes, 2):
        assert not boxes_overlap(a, b), (a, b)
    for box in boxes:
        assert box[0] >= left and box[2] <= right and box[1] >= 0
    assert placed[-1][1].text.endswith("…")
    # Marks far apart share the first lane.
    far = place_handovers([(100.0, "hot-swap → a v2"), (600.0, "hot-swap → a v3")], left, right, 8)
    assert [lane for lane, _ in far] == [0, 0]


def test_text_width_is_generous_for_wide_letters():
    assert text_width("mmmm", 10) > text_width("iiii", 10)
    assert TextBox("abc", 10, 20, HANDOVER_FONT).box[0] == 10


def _checkpoint(slot: uuid.UUID, label: str, number: int, rotation: int, start, until):
    return CheckpointStats(
        version_id=uuid.uuid4(),
        slot_id=slot,
        slot_label=label,
        internal_id=f"{label}-internal-{number}.{rotation}",
        effective_from=start,
        effective_until=until,
        version_number=number,
        key_rotation=rotation,
    )


def crowded_series() -> tuple[TimeSeries, list[CheckpointStats]]:
    """Two slots over two hours of minute buckets; slot rc1 swaps five times within
    six minutes (one a key rotation), slot rc2 once near the right edge."""
    rc1, rc2 = uuid.uuid4(), uuid.uuid4()
    swaps = [START + timedelta(minutes=40, seconds=70 * i) for i in range(5)]
    starts = [START - timedelta(days=1), *swaps]
    ends = [*swaps, None]
    numbering = [(1, 0), (2, 0), (2, 1), (3, 0), (4, 0), (5, 0)]
    checkpoints = [
        _checkpoint(rc1, "rc1", number, rotation, begin, end)
        for (number, rotation), begin, end in zip(numbering, starts, ends, strict=True)
    ]
    late = START + timedelta(minutes=118)
    checkpoints += [
        _checkpoint(rc2, "rc2", 1, 0, START - timedelta(days=1), late),
        _checkpoint(rc2, "rc2", 2, 0, late, None),
    ]
    buckets = [START + timedelta(minutes=i) for i in range(120)]
    counts = {}
    for c in checkpoints:
        counts[c.version_id] = [
            (3 + i % 4)
            if moment + timedelta(minutes=1) > c.effective_from
            and (c.effective_until is None or moment < c.effective_until)
            else 0
            for i, moment in enumerate(buckets)
        ]
    return TimeSeries(bucket_seconds=60, buckets=buckets, counts=counts), checkpoints


def parse(svg) -> ET.Element:
    """Our own chart markup, just generated (every database text in it escaped)."""
    return ET.fromstring(str(svg))  # noqa: S314 - not untrusted input


def _text_boxes(svg: ET.Element) -> list[tuple[str, tuple, ET.Element]]:
    """(class, box) of every unrotated text of the chart, honouring text-anchor."""
    found = []
    for text in svg.iter(f"{SVG}text"):
        if text.get("transform"):
            continue
        content = text.text or ""  # a <title> child is a tooltip, not drawn
        size = float(text.get("font-size"))
        width = text_width(content, size)
        x = float(text.get("x"))
        anchor = text.get("text-anchor", "start")
        start = x - width / 2 if anchor == "middle" else x - width if anchor == "end" else x
        box = TextBox(content, start, float(text.get("y")), size)
        found.append((text.get("class", ""), (start, box.box[1], start + width, box.box[3])))
    return found


def test_the_requests_chart_keeps_every_hot_swap_label_apart_and_inside_the_svg():
    series, checkpoints = crowded_series()
    svg = parse(requests_over_time(series, checkpoints))
    _, _, width, height = (float(v) for v in svg.get("viewBox").split())
    texts = _text_boxes(svg)
    labels = [box for kind, box in texts if kind == "mx-handover-label"]
    assert len(labels) == 6
    for box in labels:
        assert box[0] >= 0 and box[2] <= width and box[1] >= 0 and box[3] <= height
    for a, b in combinations(labels, 2):
        assert not boxes_overlap(a, b)
    others = [box for kind, box in texts if kind != "mx-handover-label"]
    for label in labels:
        assert not any(boxes_overlap(label, other) for other in others)
    for _, box in texts:
        assert box[3] <= height, "a text runs past the bottom of the chart"
    text = "".join(svg.itertext())
    assert "key rotated → rc1 v2.1" in text and "hot-swap → rc2 v2" in text


def test_series_are_flat_steps_drawn_only_while_the_checkpoint_served():
    series, checkpoints = crowded_series()
    svg = parse(requests_over_time(series, checkpoints))
    paths = {"".join(p.itertext()): p.get("d") for p in svg.iter(f"{SVG}path") if p.get("class")}
    assert len(paths) == len(checkpoints)
    for d in paths.values():
        # Moves, horizontals and verticals only: never a slope between two buckets.
        assert re.fullmatch(r"(M[\d.]+,[\d.]+|H[\d.]+|V[\d.]+)+", d), d
    # A checkpoint's line starts where it began serving and stops at its hand-over.
    first_rc2 = next(c for c in checkpoints if c.slot_label == "rc2" and c.version_number == 1)
    second_rc2 = next(c for c in checkpoints if c.slot_label == "rc2" and c.version_number == 2)
    first = paths[f"{first_rc2.label} ({first_rc2.internal_id})"]
    second = paths[f"{second_rc2.label} ({second_rc2.internal_id})"]
    first_end = max(float(x) for x in re.findall(r"H([\d.]+)", first))
    second_start = float(re.match(r"M([\d.]+),", second).group(1))
    plot_right = float(svg.get("viewBox").split()[2]) - 20
    assert first_end < plot_right - 10
    assert second_start >= first_end - 2 * (plot_right - 64) / 120  # at most the shared bucket


def test_a_chart_with_many_checkpoints_grows_to_fit_its_legend():
    buckets = [START + timedelta(minutes=i) for i in range(10)]

    def chart(slots: int) -> float:
        checkpoints = [
            _checkpoint(uuid.uuid4(), f"slot-{i}", 1, 0, START - timedelta(days=1), None)
            for i in range(slots)
        ]
        counts = {c.version_id: [1] * len(buckets) for c in checkpoints}
        svg = requests_over_time(TimeSeries(60, buckets, counts), checkpoints)
        root = parse(svg)
        height = float(root.get("viewBox").split()[3])
        assert all(box[3] <= height for _, box in _text_boxes(root))
        return height

    assert chart(14) > chart(2)
    assert len(charts.PALETTE) < 14  # colours cycle
