"""The admin in headless chromium: the whole life of an experiment, clicked through."""

from __future__ import annotations

import os

import pytest
from django.urls import reverse

from experiments import selectors, services
from experiments.models import Experiment, ExperimentStatus
from tests.browser import chromium_page, screenshot
from tests.factories import SuperUserFactory

# pytest-django's live server and playwright's sync API share the test thread.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-1234"


def log_in(page, base_url: str, username: str) -> None:
    page.goto(base_url + reverse("admin:login"))
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")


def run_action(page, base_url: str, experiment: Experiment, action: str, query: str = "") -> str:
    page.goto(base_url + reverse("admin:experiments_experiment_changelist") + query)
    page.check(f'input.action-select[value="{experiment.pk}"]')
    page.select_option("select[name=action]", action)
    page.click("button[name=index]")
    return page.inner_text("ul.messagelist")


def hot_swap_through_editor(page, label: str, internal_id: str, key: str, shot: str = ""):
    # Rows are in bucket order (variant id), not creation order: find the slot by label.
    row = page.locator("#variants-group tr", has=page.locator(f'input[value="{label}"]'))
    row.locator("a.mx-hot-swap-link").click()
    # The django-jsonform editor (React) must have rendered from its static files.
    editor = page.locator("#id_upstream_jsonform .rjf-form-wrapper")
    editor.wait_for()
    editor.locator('input[name="rjf§internal_id"]').fill(internal_id)
    editor.locator('input[name="rjf§base_url"]').fill("https://partner.example/v1")
    editor.locator('select[name="rjf§opencode_settings§ai_sdk_provider"]').select_option(
        "openai-compatible"
    )
    editor.locator('input[name="rjf§add_cache_breakpoints"]').check()
    page.fill("#id_api_key", key)
    if shot:
        screenshot(page, shot)
    page.click("input[name=_save]")
    page.wait_for_selector("ul.messagelist")
    return page.inner_text("ul.messagelist")


def test_staff_runs_an_experiment_from_draft_to_archive_in_the_browser(live_server, canary_key):
    SuperUserFactory(username="operator")
    base = live_server.url
    with chromium_page() as page:
        log_in(page, base, "operator")

        # Create the experiment with two weighted variants in one form.
        page.goto(base + reverse("admin:experiments_experiment_add"))
        page.fill("#id_name", "Preview foo trial")
        page.fill("#id_public_model_id", "kilo/preview-foo")
        page.fill("#id_variants-0-label", "control")
        page.fill("#id_variants-0-weight", "1")
        page.fill("#id_variants-1-label", "candidate")
        page.fill("#id_variants-1-weight", "3")
        page.click("input[name=_continue]")
        page.wait_for_selector("ul.messagelist")
        experiment = Experiment.objects.get(public_model_id="kilo/preview-foo")
        change_url = base + reverse("admin:experiments_experiment_change", args=[experiment.pk])
        assert page.url == change_url

        # Load a checkpoint into each slot through the editor and the key field.
        message = hot_swap_through_editor(page, "control", "foo-rc1", canary_key, shot="hot-swap")
        assert "now serves 'foo-rc1'" in message
        message = hot_swap_through_editor(page, "candidate", "foo-rc2", canary_key)
        assert "now serves 'foo-rc2'" in message
        assert canary_key not in page.content()

        assert "Activated (draft → active)" in run_action(page, base, experiment, "activate")
        screenshot(page, "changelist")

        page.goto(change_url)
        variants_table = page.inner_text("#variants-group")
        assert "25.0%" in variants_table
        assert "75.0%" in variants_table
        assert "foo-rc1" in variants_table
        assert "partner.example" in variants_table
        assert page.locator('input[name="variants-0-weight"]').count() == 0  # locked
        screenshot(page, "change-page")

        assert "Paused (active → paused)" in run_action(page, base, experiment, "pause")
        assert "Completed (paused → completed)" in run_action(page, base, experiment, "complete")
        assert "Archived (completed → completed, archived)" in run_action(
            page, base, experiment, "archive"
        )
        # Archived experiments leave the default list and show under the filter.
        assert "Preview foo trial" not in page.inner_text("#changelist-form")
        page.goto(base + reverse("admin:experiments_experiment_changelist") + "?archived=yes")
        assert "Preview foo trial" in page.inner_text("#result_list")
        screenshot(page, "changelist-archived")

    experiment.refresh_from_db()
    assert (experiment.status, experiment.is_archived) == (ExperimentStatus.COMPLETED, True)
    current = {
        variant.label: selectors.current_version(variant).upstream
        for variant in experiment.variants.all()
    }
    assert current["control"] == {
        "internal_id": "foo-rc1",
        "base_url": "https://partner.example/v1",
        "opencode_settings": {"ai_sdk_provider": "openai-compatible"},
        "add_cache_breakpoints": True,
    }
    assert current["candidate"]["internal_id"] == "foo-rc2"


def test_hot_swap_error_is_shown_next_to_the_field_in_the_browser(live_server):
    SuperUserFactory(username="operator")
    experiment = services.create_experiment(public_model_id="kilo/x", name="X")
    services.add_variant(experiment=experiment, label="only", weight=1)
    base = live_server.url
    with chromium_page() as page:
        log_in(page, base, "operator")
        page.goto(base + reverse("admin:experiments_experiment_change", args=[experiment.pk]))
        page.locator("a.mx-hot-swap-link").first.click()
        editor = page.locator("#id_upstream_jsonform .rjf-form-wrapper")
        editor.locator('input[name="rjf§internal_id"]').fill("rc")
        editor.locator('input[name="rjf§base_url"]').fill("ftp://partner.example")
        page.fill("#id_api_key", "sk-something")
        page.click("input[name=_save]")
        errors = page.inner_text(".field-upstream ul.errorlist")
        assert "base_url: Value error, must be an http(s) URL" in errors
        assert page.input_value("#id_api_key") == ""  # the key is never rendered back
        assert not selectors.current_version(experiment.variants.get())
