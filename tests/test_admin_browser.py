"""The admin in headless chromium: the life of an experiment, clicked through on its page."""

from __future__ import annotations

import logging
import os

import httpx
import pytest
from django.urls import reverse

from experiments import services
from experiments.models import Experiment, ExperimentStatus
from gateway.models import GatewayToken
from gateway.tokens import hash_token
from tests.browser import chromium_page, screenshot
from tests.factories import SuperUserFactory, UserFactory
from tests.gateway_server import requires_server, wait_until
from tests.gateway_support import active_experiment, expected_variant_id
from tests.upstream import PARTNER_API_KEY

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


def slot_row(page, label: str):
    # Rows are in creation order; find the slot by its label anyway.
    return page.locator("#variants-group tr", has=page.locator(f'input[value="{label}"]'))


def fill_upstream_editor(page, internal_id: str, base_url: str) -> None:
    # The django-jsonform editor (React) must have rendered from its static files.
    editor = page.locator("#id_upstream_jsonform .rjf-form-wrapper")
    editor.wait_for()
    editor.locator('input[name="rjf§internal_id"]').fill(internal_id)
    editor.locator('input[name="rjf§base_url"]').fill(base_url)
    editor.locator('select[name="rjf§opencode_settings§ai_sdk_provider"]').select_option(
        "openai-compatible"
    )


def hot_swap_through_editor(
    page, label: str, internal_id: str, base_url: str, key: str, *, test: bool, shot: str = ""
) -> str:
    slot_row(page, label).locator("a.mx-hot-swap-link").click()
    fill_upstream_editor(page, internal_id, base_url)
    page.fill("#id_api_key", key)
    if not test:
        page.uncheck("#id_test_before_saving")
    if shot:
        screenshot(page, shot)
    page.click("input[name=_save]")
    page.wait_for_selector("ul.messagelist")
    return page.inner_text("ul.messagelist")


def checklist_row(page, label: str):
    return page.locator(f"li.mx-check-item-test{label}")


def test_staff_runs_an_experiment_from_draft_to_completed_on_its_change_page(
    live_server, keyed_upstream, canary_key
):
    SuperUserFactory(username="operator")
    base = live_server.url
    with chromium_page() as page:
        missing = []  # no page, script, style or icon of the session is missing
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        log_in(page, base, "operator")

        # Two slots in the same submit as the experiment; weights start at 1.
        page.goto(base + reverse("admin:experiments_experiment_add"))
        page.fill("#id_name", "Preview foo trial")
        page.fill("#id_public_model_id", "kilo/preview-foo")
        page.fill("#id_variants-0-label", "control")
        page.fill("#id_variants-1-label", "candidate")
        page.fill("#id_variants-1-weight", "3")
        screenshot(page, "add-experiment-with-two-slots")
        page.click("input[name=_continue]")
        page.wait_for_selector("ul.messagelist")
        experiment = Experiment.objects.get(public_model_id="kilo/preview-foo")
        change_url = base + reverse("admin:experiments_experiment_change", args=[experiment.pk])
        assert page.url == change_url
        assert [variant.weight for variant in experiment.variants.order_by("created_at")] == [1, 3]

        # Control gets a wrong partner key; its connection test fails in the checklist.
        message = hot_swap_through_editor(
            page, "control", "foo-rc1", keyed_upstream.base_url, canary_key, test=False
        )
        assert "now serves 'foo-rc1'" in message
        checklist_row(page, "control").locator("button.mx-test-connection").click()
        page.wait_for_selector("ul.messagelist")
        failed = checklist_row(page, "control").inner_text()
        assert failed.startswith("✗")
        assert "failed at" in failed and "HTTP 401" in failed
        screenshot(page, "checklist-failed-connection-test")

        # The candidate is loaded with the right key and tested on saving.
        message = hot_swap_through_editor(
            page, "candidate", "foo-rc2", keyed_upstream.base_url, PARTNER_API_KEY, test=True
        )
        assert "connection test passed" in message

        # Fix control: rotate to the right key; the new version is tested on saving.
        slot_row(page, "control").locator("a.mx-rotate-key-link").click()
        page.fill("#id_api_key", PARTNER_API_KEY)
        page.click("input[name=_save]")
        page.wait_for_selector("ul.messagelist")
        assert "connection test passed" in page.inner_text("ul.messagelist")
        assert checklist_row(page, "control").inner_text().startswith("✓")
        assert checklist_row(page, "candidate").inner_text().startswith("✓")
        assert canary_key not in page.content()
        assert PARTNER_API_KEY not in page.content()
        screenshot(page, "checklist-ready")

        # Activate, pause and complete from the change page's buttons.
        page.click("button.mx-transition-activate")
        assert "Activated (draft → active)" in page.inner_text("ul.messagelist")
        page.click("button.mx-transition-pause")
        assert "Paused (active → paused)" in page.inner_text("ul.messagelist")
        screenshot(page, "change-page-paused")
        page.click("button.mx-transition-complete")
        consequences = page.inner_text(".mx-consequences")
        assert "'kilo/preview-foo' stops routing to this experiment at once" in consequences
        screenshot(page, "complete-confirmation")
        page.click("#mx-confirm-transition")
        assert "Completed (paused → completed)" in page.inner_text("ul.messagelist")
        assert page.url == change_url
        assert page.locator("a.mx-hot-swap-link").count() == 0
        assert page.title().endswith("| Model Experiments")
        assert missing == []

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.COMPLETED
    assert services.current_version(experiment.variants.get(label="control")).upstream == {
        "internal_id": "foo-rc1",
        "base_url": keyed_upstream.base_url,
        "opencode_settings": {"ai_sdk_provider": "openai-compatible"},
    }


def test_hot_swap_error_is_shown_next_to_the_field_in_the_browser(live_server):
    SuperUserFactory(username="operator")
    experiment = services.create_experiment(public_model_id="kilo/x", name="X")
    services.add_variant(experiment=experiment, label="only", weight=1)
    base = live_server.url
    with chromium_page() as page:
        log_in(page, base, "operator")
        page.goto(base + reverse("admin:experiments_experiment_change", args=[experiment.pk]))
        page.locator("a.mx-hot-swap-link").first.click()
        fill_upstream_editor(page, "rc", "ftp://partner.example")
        page.fill("#id_api_key", "sk-something")
        page.click("input[name=_save]")
        errors = page.inner_text(".field-upstream ul.errorlist")
        assert "Base URL must be an http(s) URL with a host" in errors
        assert page.input_value("#id_api_key") == ""  # the key is never rendered back
        assert not services.current_version(experiment.variants.get())


def test_staff_creates_copies_and_revokes_a_gateway_token_in_the_browser(live_server):
    SuperUserFactory(username="operator")
    dana = UserFactory(username="dana")
    base = live_server.url
    with chromium_page() as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        log_in(page, base, "operator")

        # From the user's page: "Add gateway token" opens the form for that user.
        page.goto(base + reverse("admin:auth_user_change", args=[dana.pk]))
        page.click("a.mx-add-token")
        assert page.input_value("#id_user") == str(dana.pk)
        page.fill("#id_name", "laptop")
        page.click("input[name=_save]")
        plaintext = page.inner_text("#mx-token")
        page.click("#mx-copy-token")
        page.wait_for_selector("#mx-copy-done:not([hidden])")
        assert page.evaluate("navigator.clipboard.readText()") == plaintext
        screenshot(page, "gateway-token-created")
        token = GatewayToken.objects.get()
        assert (token.user, token.token_sha256) == (dana, hash_token(plaintext))

        # Never shown again; revoked from its page after a confirmation.
        page.click("text=Done")
        assert plaintext not in page.content()
        page.click("a.mx-revoke-token")
        screenshot(page, "gateway-token-revoke-confirmation")
        page.click("#mx-confirm-revoke")
        assert "Revoked token" in page.inner_text("ul.messagelist")
        assert page.locator("a.mx-revoke-token").count() == 0

    token.refresh_from_db()
    assert token.revoked_at is not None


@requires_server
def test_a_wrong_key_is_caught_before_it_serves_in_an_active_experiment(
    live_server, gateway, keyed_upstream, canary_key, caplog
):
    """Staff type a wrong key on hot-swap in an active experiment: the test fails before
    anything is inserted and the slot keeps serving (database and gateway agree); with the
    right key the swap goes through, its test shown in the version history."""
    caplog.set_level(logging.DEBUG)
    SuperUserFactory(username="operator")
    experiment = active_experiment(keyed_upstream, api_key=PARTNER_API_KEY)
    machine = {"x-kilocode-machineid": "m-swap-in-browser"}
    slot = experiment.variants.get(
        pk=expected_variant_id(experiment, "machine", machine["x-kilocode-machineid"])
    )
    old = services.current_version(slot).internal_id

    def served() -> str:
        response = httpx.post(
            gateway.base_url + "/chat/completions",
            json={
                "model": experiment.public_model_id,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers=machine,
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return keyed_upstream.received[-1]["json"]["model"]

    assert wait_until(lambda: served() == old, timeout=10)
    base = live_server.url
    with chromium_page() as page:
        log_in(page, base, "operator")
        page.goto(base + reverse("admin:experiments_experiment_change", args=[experiment.pk]))
        slot_row(page, slot.label).locator("a.mx-hot-swap-link").click()
        assert "tested before it is saved" in page.inner_text(".mx-test-required")
        fill_upstream_editor(page, "rc-new", keyed_upstream.base_url)
        page.fill("#id_api_key", canary_key)
        page.click("input[name=_save]")
        failed = page.inner_text(".mx-candidate-check")
        assert "Connection test of the new checkpoint failed: HTTP 401" in failed
        assert "Nothing was saved." in failed
        assert page.locator("#id_anyway").is_visible()
        assert canary_key not in page.content()
        assert page.input_value("#id_api_key") == ""
        screenshot(page, "hot-swap-wrong-key-refused")

        # Nothing changed: the database and the running gateway still serve the old one.
        assert services.current_version(slot).internal_id == old
        assert not slot.versions.filter(upstream__internal_id="rc-new").exists()
        assert served() == old

        # The right key: tested first with the button (nothing saved), then swapped.
        page.fill("#id_api_key", PARTNER_API_KEY)
        page.click("input[name=_test]")
        assert "passed" in page.inner_text(".mx-candidate-check")
        assert services.current_version(slot).internal_id == old
        screenshot(page, "hot-swap-right-key-tested")
        page.fill("#id_api_key", PARTNER_API_KEY)
        page.click("input[name=_save]")
        page.wait_for_selector("ul.messagelist")
        assert (
            f"now serves 'rc-new' as {slot.label} v2; connection test passed (HTTP 200"
            in page.inner_text("ul.messagelist")
        )
        current = slot_row(page, slot.label).locator("tr.mx-current-version").inner_text()
        assert "rc-new" in current and "✓ HTTP 200" in current
        assert canary_key not in page.content() and PARTNER_API_KEY not in page.content()
        screenshot(page, "hot-swap-tested-in-history")

    assert wait_until(lambda: served() == "rc-new", timeout=10)
    assert canary_key not in gateway.log()
    assert canary_key not in caplog.text
