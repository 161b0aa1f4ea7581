"""Headless chromium on the stats page: hot-swap labels that chromium itself draws never
overlap and stay inside the chart, checkpoints carry their names, and an experiment
without requests shows an empty state. Screenshots go to var/screenshots/."""

from __future__ import annotations

import os
from datetime import timedelta
from itertools import combinations

import pytest

from tests.browser import chromium_page, screenshot
from tests.factories import (
    SuperUserFactory,
    VariantVersionFactory,
    make_experiment,
    upstream_config,
)
from tests.report_seed import seed_experiment

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

#: The drawn boxes of the requests chart's texts and of the chart itself, in page pixels.
BOXES_JS = """
(svg) => {
  const box = (element) => {
    const r = element.getBoundingClientRect();
    return {left: r.left, top: r.top, right: r.right, bottom: r.bottom};
  };
  return {
    svg: box(svg),
    labels: [...svg.querySelectorAll("text.mx-handover-label")].map(
      (t) => ({text: t.firstChild.textContent, ...box(t)})
    ),
    others: [...svg.querySelectorAll("text:not(.mx-handover-label)")].map(
      (t) => ({text: t.textContent, ...box(t)})
    ),
  };
}
"""


def _overlap(a: dict, b: dict) -> bool:
    return (
        a["left"] < b["right"]
        and b["left"] < a["right"]
        and a["top"] < b["bottom"]
        and b["top"] < a["bottom"]
    )


def _inside(inner: dict, outer: dict) -> bool:
    return (
        inner["left"] >= outer["left"]
        and inner["right"] <= outer["right"]
        and inner["top"] >= outer["top"]
        and inner["bottom"] <= outer["bottom"]
    )


@pytest.fixture
def page(live_server):
    SuperUserFactory(username="stats-admin")
    with chromium_page(width=1360) as browser_page:
        browser_page.goto(f"{live_server.url}/admin/login/")
        browser_page.fill("#id_username", "stats-admin")
        browser_page.fill("#id_password", "pw-for-tests-1234")
        browser_page.click("input[type=submit]")
        yield browser_page


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_hot_swaps_close_together_get_labels_that_never_overlap(page, live_server):
    seeded = seed_experiment(subjects=80, requests=600)
    slot_a, slot_b = seeded.versions["a2"].variant, seeded.versions["b1"].variant
    # Four more hand-overs within two minutes of the seeded one, one a key rotation.
    VariantVersionFactory(
        variant=slot_a,
        upstream=seeded.versions["a2"].upstream,
        effective_at=seeded.swap_at + timedelta(seconds=45),
    )
    for index, seconds in enumerate((20, 50, 80), start=2):
        VariantVersionFactory(
            variant=slot_b,
            upstream=upstream_config(internal_id=f"rc-bravo-{index}"),
            effective_at=seeded.swap_at + timedelta(seconds=seconds),
        )

    page.goto(f"{live_server.url}/admin/experiments/experiment/{seeded.experiment.pk}/stats/")
    chart = page.locator("#requests-chart svg.mx-chart")
    boxes = chart.evaluate(BOXES_JS)
    labels = boxes["labels"]
    assert sorted(label["text"] for label in labels) == [
        "hot-swap → slot-a v2",
        "hot-swap → slot-b v2",
        "hot-swap → slot-b v3",
        "hot-swap → slot-b v4",
        "key rotated → slot-a v2.1",
    ]
    for a, b in combinations(labels, 2):
        assert not _overlap(a, b), (a, b)
    for label in labels:
        assert _inside(label, boxes["svg"]), label
        crossed = [other["text"] for other in boxes["others"] if _overlap(label, other)]
        assert not crossed, (label["text"], crossed)
    for other in boxes["others"]:
        assert _inside(other, boxes["svg"]), other
    table = page.inner_text("#checkpoints")
    assert "slot-a v2.1" in table and "key rotated" in table and "slot-b v4" in table
    screenshot(page, "stats-crowded-hot-swaps")


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_an_experiment_without_requests_shows_an_empty_state(page, live_server):
    experiment = make_experiment()
    page.goto(f"{live_server.url}/admin/experiments/experiment/{experiment.pk}/stats/")
    empty = page.locator("#stats-empty")
    assert empty.is_visible()
    assert "No requests yet" in empty.inner_text()
    assert page.locator("svg.mx-chart").count() == 0
    assert "slot-a v1" in page.inner_text("#checkpoints")
    screenshot(page, "stats-empty-experiment")
