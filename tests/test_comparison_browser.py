"""Headless chromium: staff choose the control on the experiment's page, and the Stats page
compares the others against it with coloured verdicts (green better, red worse, grey
inconclusive) and names its method."""

from __future__ import annotations

import os

import pytest

from experiments import selectors
from experiments.feedback import FeedbackItem, record_feedback
from experiments.models import FeedbackSource
from tests.browser import chromium_page, screenshot
from tests.comparison_seed import seed_comparison
from tests.factories import SuperUserFactory

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

GREEN, RED, GREY = "rgb(46, 125, 50)", "rgb(186, 33, 33)", "rgb(224, 224, 224)"


@pytest.fixture
def page():
    with chromium_page(width=1360) as browser_page:
        yield browser_page


def verdict_colours(page) -> dict[tuple[str, str], tuple[str, str]]:
    """(candidate version id, metric) -> (verdict text, badge background colour)."""
    found = {}
    for row in page.locator("#comparison-table tr.mx-comparison").all():
        badge = row.locator(".mx-verdict")
        found[(row.get_attribute("data-candidate"), row.get_attribute("data-metric"))] = (
            badge.inner_text().strip(),
            badge.evaluate("element => getComputedStyle(element).backgroundColor"),
        )
    return found


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_staff_choose_a_control_and_read_coloured_verdicts(page, live_server):
    seeded = seed_comparison()
    versions = {label: str(version.pk) for label, version in seeded.versions.items()}
    # Users rated 600 answers of each slot: 45% liked the control's, 75% the faster one's,
    # 44% the slower one's (joined to the checkpoint that served each id).
    liked = {"control": 0.45, "faster": 0.75, "slower": 0.44}
    record_feedback(
        [
            FeedbackItem(f"msg-{label}-{index}", "up" if index % 100 < share * 100 else "down")
            for label, share in liked.items()
            for index in range(600)
        ],
        source=FeedbackSource.CSV,
        submitted_by_id=None,
    )
    SuperUserFactory(username="comparisons-admin")
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "comparisons-admin")
    page.fill("#id_password", "pw-for-tests-1234")
    page.click("input[type=submit]")

    stats = f"{live_server.url}/admin/experiments/experiment/{seeded.experiment.pk}/stats/"
    page.goto(stats)
    assert "Control: slot control" in page.inner_text("#control-name")
    colours = verdict_colours(page)
    assert colours[(versions["faster"], "error_rate")] == ("better", GREEN)
    assert colours[(versions["faster"], "total_latency_p50")] == ("better", GREEN)
    assert colours[(versions["faster"], "throughput_p50")] == ("better", GREEN)
    assert colours[(versions["slower"], "total_latency_p95")] == ("worse", RED)
    assert colours[(versions["slower"], "throughput_p50")] == ("worse", RED)
    assert colours[(versions["slower"], "error_rate")] == ("inconclusive", GREY)
    # Feedback is one more comparison, higher is better.
    assert colours[(versions["faster"], "feedback_share_up")] == ("better", GREEN)
    assert colours[(versions["slower"], "feedback_share_up")] == ("inconclusive", GREY)
    method = page.inner_text("#comparison-method")
    assert "Howard, Ramdas, McAuliffe & Sekhon" in method and "Holm" in method
    screenshot(page, "comparisons-stats")

    # The control is chosen on the experiment's page…
    page.goto(f"{live_server.url}/admin/experiments/experiment/{seeded.experiment.pk}/change/")
    page.select_option("#id_control", label="faster")
    page.click("input[name=_continue]")
    page.wait_for_selector(".messagelist")
    assert selectors.control_slot(seeded.experiment).label == "faster"

    # …and the Stats page now compares the others against it: the old control is worse.
    page.goto(stats)
    assert "Control: slot faster" in page.inner_text("#control-name")
    colours = verdict_colours(page)
    assert colours[(versions["control"], "error_rate")] == ("worse", RED)
    assert colours[(versions["control"], "total_latency_mean")] == ("worse", RED)
    assert {candidate for candidate, _ in colours} == {versions["control"], versions["slower"]}

    page.click("#toggle-all-checkpoints")
    page.wait_for_url("**all_checkpoints=1**")
    assert "Compare only each slot's current checkpoint" in page.inner_text(
        "#toggle-all-checkpoints"
    )
    screenshot(page, "comparisons-stats-control-changed")
