"""The key-mismatch warning on the experiment's change page, seen in headless chromium."""

from __future__ import annotations

import os

import pytest
from django.urls import reverse

from experiments import crypto, services
from tests.browser import chromium_page, screenshot
from tests.factories import SuperUserFactory, make_experiment, upstream_config
from tests.test_admin_browser import log_in

# pytest-django's live server and playwright's sync API share the test thread.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_change_page_warns_in_the_browser_when_a_slot_was_encrypted_under_another_key(
    live_server, settings
):
    SuperUserFactory(username="operator")
    experiment = make_experiment()
    slot = experiment.variants.order_by("id").first()
    running_key, other_key = settings.BYOK_ENCRYPTION_KEY, crypto.generate_key()
    settings.BYOK_ENCRYPTION_KEY = other_key  # a command run in a shell with another key
    services.hot_swap(variant=slot, upstream=upstream_config(), api_key="sk-partner")
    settings.BYOK_ENCRYPTION_KEY = running_key
    with chromium_page() as page:
        log_in(page, live_server.url, "operator")
        page.goto(
            live_server.url + reverse("admin:experiments_experiment_change", args=[experiment.pk])
        )
        warning = page.inner_text(".mx-key-warning")
        screenshot(page, "key-mismatch-warning")
    assert f"Slot {slot.label!r}" in warning
    assert crypto.key_fingerprint(other_key) in warning
    assert crypto.key_fingerprint(running_key) in warning
