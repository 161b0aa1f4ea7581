"""Headless chromium: staff set the response capture rate on the change page, read a
request's prompt and answer, and compare the answers of two checkpoints to one prompt."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest

from experiments.models import Experiment
from experiments.prompts.answers import canonical_answer
from experiments.prompts.store import canonical_body, get_prompt_store
from tests.browser import chromium_page, screenshot
from tests.factories import SuperUserFactory, make_experiment
from tests.test_response_capture import answer, attribute, versions

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"


@pytest.fixture
def page():
    with chromium_page(width=1360) as browser_page:
        yield browser_page


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_staff_set_the_rate_read_an_answer_and_compare_checkpoints(
    page, live_server, settings, tmp_path
):
    settings.PROMPT_STORE_BACKEND = "local"
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    store = get_prompt_store()
    experiment = make_experiment(status="active")
    first, second = versions(experiment)
    prompt = store.put(
        canonical_body(
            {
                "model": experiment.public_model_id,
                "messages": [
                    {"role": "system", "content": "You are a weather assistant."},
                    {"role": "user", "content": "What is the weather in Paris?"},
                ],
            }
        )[0]
    )
    sunny = store.put_answer(canonical_answer(answer("It is sunny in Paris, 21 °C.")))
    tool = store.put_answer(
        canonical_answer(
            answer(
                "Let me check the forecast.",
                [{"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}],
            )
        )
    )
    attribute(first, prompt=prompt, answer_sha=sunny)
    asked = attribute(second, prompt=prompt, answer_sha=tool)
    SuperUserFactory(username="answers-admin")

    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "answers-admin")
    page.fill("#id_password", "pw-for-tests-1234")
    page.click("input[type=submit]")

    # The rate on the control room page: a bad value says why, a good one is saved.
    change = f"{live_server.url}/admin/experiments/experiment/{experiment.pk}/change/"
    page.goto(change)
    page.fill("#id_response_capture_rate", "half")
    page.click("input[name=_continue]")
    assert "percentage from 0 to 100" in page.inner_text("#content-main")
    page.fill("#id_response_capture_rate", "12.5")
    page.click("input[name=_continue]")
    page.wait_for_selector(".messagelist")
    assert Experiment.objects.get(pk=experiment.pk).response_capture_rate == Decimal("12.5")
    assert page.input_value("#id_response_capture_rate") == "12.5"
    screenshot(page, "answers-capture-rate")

    page.goto(
        f"{live_server.url}/admin/experiments/experiment/{experiment.pk}/requests/{asked.pk}/"
    )
    assert "What is the weather in Paris?" in page.inner_text("#prompt-messages")
    assert page.inner_text("#answer-text") == "Let me check the forecast."
    assert "get_weather" in page.inner_text("#answer")
    screenshot(page, "answers-request-detail")

    page.click("#compare-link")
    page.wait_for_selector("#compare-columns")
    columns = page.locator(".mx-compare-column")
    assert columns.count() == 2
    texts = page.locator(".mx-answer-text").all_inner_texts()
    assert sorted(texts) == ["It is sunny in Paris, 21 °C.", "Let me check the forecast."]
    assert "What is the weather in Paris?" in page.inner_text("#compare-prompt")
    screenshot(page, "answers-compare")
