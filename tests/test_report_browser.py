"""Headless chromium through the report pages: stats charts, request browser, prompt."""

from __future__ import annotations

import json
import os

import pytest

from experiments.models import ExperimentRequest
from experiments.prompts.store import get_prompt_store
from tests.browser import SCREENSHOT_DIR, chromium_page, screenshot
from tests.factories import SuperUserFactory
from tests.report_seed import seed_experiment

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"


@pytest.fixture
def page():
    with chromium_page(width=1360) as browser_page:
        yield browser_page


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_staff_reads_stats_browses_requests_and_inflates_a_prompt(
    page, live_server, settings, tmp_path
):
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    seeded = seed_experiment(subjects=120, requests=900, share_of_slot_a=0.7)
    newest = max(seeded.requests, key=lambda r: (r.created_at, r.usage_id))
    body = {
        "model": seeded.experiment.public_model_id,
        "messages": [
            {"role": "system", "content": "You are a careful reviewer."},
            {"role": "user", "content": "Summarise the checkpoint comparison."},
        ],
    }
    sha256 = get_prompt_store().put(json.dumps(body).encode())
    ExperimentRequest.objects.filter(usage_id=newest.usage_id).update(request_body_sha256=sha256)
    SuperUserFactory(username="reports-admin")

    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "reports-admin")
    page.fill("#id_password", "pw-for-tests-1234")
    page.click("input[type=submit]")

    page.goto(f"{live_server.url}/admin/experiments/experiment/{seeded.experiment.pk}/stats/")
    assert page.locator("svg.mx-chart").count() == 3
    assert page.locator("svg.mx-chart path.mx-series").count() == 3
    assert page.locator("svg.mx-chart line.mx-handover").count() == 1
    assert page.locator("#srm-warning").is_visible()
    # Quality signals per checkpoint: error categories, finish reasons, tool-call rate.
    assert page.locator("#errors-by-kind tbody tr").count() == 3
    assert page.locator("#finish-reasons td.mx-tool-calls").count() == 3
    assert "TOOL CALLS" in page.inner_text("#finish-reasons thead").upper()
    screenshot(page, "reports-stats")
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.locator("#quality").screenshot(path=str(SCREENSHOT_DIR / "reports-quality-signals.png"))

    page.click("nav.mx-nav >> text=Requests")
    assert page.locator("#request-list tbody tr").count() == 50
    screenshot(page, "reports-requests")
    page.click("#next-page")
    assert page.locator("#request-list tbody tr").count() == 50

    page.click("nav.mx-nav >> text=Requests")
    page.locator("#request-list tbody tr").first.locator("td").nth(2).click()
    page.wait_for_selector("#prompt-messages")
    assert "Summarise the checkpoint comparison." in page.inner_text("#prompt-messages")
    screenshot(page, "reports-request-detail")
