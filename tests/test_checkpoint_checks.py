"""Checkpoints are tested before they serve (issue #9): one small request through the
gateway's own upstream client, stored per version, shown in the admin and the commands.

The partner is the real demo upstream on loopback (``keyed_upstream`` answers 401 for a
wrong key); an unreachable partner is a real severed connection (``tcp_proxy``).
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from experiments import services
from experiments.models import CheckpointCheck, ExperimentStatus, VariantVersion
from tests.factories import make_experiment, upstream_config
from tests.test_admin import change_url, hot_swap_url, messages_of, rotate_url, staff_with
from tests.upstream import PARTNER_API_KEY

pytestmark = pytest.mark.django_db
S = ExperimentStatus


def slot_on(upstream, *, api_key: str = PARTNER_API_KEY, **upstream_fields):
    experiment = make_experiment(base_url=upstream.base_url, api_key=api_key)
    variant = experiment.variants.order_by("id").first()
    if upstream_fields:
        services.hot_swap(
            variant=variant,
            upstream=upstream_config(
                internal_id="rc-under-test", base_url=upstream.base_url, **upstream_fields
            ),
        )
    return variant


def test_check_with_the_right_key_passes_and_is_recorded_against_the_version(keyed_upstream):
    variant = slot_on(keyed_upstream)
    check = services.check_slot(variant=variant)
    assert check.ok
    assert check.status_code == 200
    assert check.latency_ms is not None
    assert check.version_id == services.current_version(variant).pk
    assert CheckpointCheck.objects.get() == check


def test_check_with_a_wrong_key_fails_with_the_partner_status_and_no_key(
    keyed_upstream, canary_key
):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    check = services.check_slot(variant=variant)
    assert not check.ok
    assert check.status_code == 401
    assert check.reason.startswith("Incorrect API key provided.")


def test_a_partner_error_echoing_the_key_is_recorded_without_it(hostile_upstream, canary_key):
    experiment = make_experiment(base_url=hostile_upstream.base_url("rc1"), api_key=canary_key)
    variant = experiment.variants.order_by("id").first()
    services.hot_swap(
        variant=variant,
        upstream=upstream_config(
            "rc-hostile", hostile_upstream.base_url("rc1"), extra_body={"hostile": "key_in_error"}
        ),
    )
    check = services.check_slot(variant=variant)
    assert (check.ok, check.status_code) == (False, 401)
    assert hostile_upstream.received[-1]["headers"]["authorization"] == f"Bearer {canary_key}"
    assert canary_key not in check.reason
    assert "[redacted]" in check.reason


def test_check_sends_one_small_chat_completion_with_the_checkpoint_transforms(keyed_upstream):
    variant = slot_on(keyed_upstream, extra_body={"reasoning_effort": "low"})
    services.check_slot(variant=variant)
    [request] = keyed_upstream.received
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {PARTNER_API_KEY}"
    assert request["json"]["model"] == "rc-under-test"
    assert request["json"]["max_tokens"] == 1
    assert request["json"]["reasoning_effort"] == "low"


def test_an_anthropic_checkpoint_is_tested_with_the_messages_api(keyed_upstream):
    variant = slot_on(keyed_upstream, opencode_settings={"ai_sdk_provider": "anthropic"})
    assert services.check_slot(variant=variant).ok
    [request] = keyed_upstream.received
    assert request["path"] == "/v1/messages"
    assert request["headers"]["x-api-key"] == PARTNER_API_KEY
    assert request["headers"]["anthropic-version"] == "2023-06-01"


def test_a_responses_checkpoint_is_tested_with_the_responses_api(keyed_upstream):
    variant = slot_on(keyed_upstream, openclaw_settings={"api_adapter": "openai-responses"})
    assert services.check_slot(variant=variant).ok
    assert [r["path"] for r in keyed_upstream.received] == ["/v1/responses"]


def test_an_unreachable_checkpoint_fails_with_the_gateway_reason(keyed_upstream, tcp_proxy):
    proxy = tcp_proxy(keyed_upstream.host, keyed_upstream.port)
    proxy.cut()
    host, port = proxy.address
    variant = make_experiment(base_url=f"http://{host}:{port}/v1").variants.first()
    check = services.check_slot(variant=variant)
    assert not check.ok
    assert check.status_code is None
    assert check.reason == "The model provider could not be reached."


def test_a_partner_error_naming_the_checkpoint_is_blinded(upstream):
    experiment = make_experiment(base_url=upstream.base_url, public_model_id="kilo/preview-x")
    variant = experiment.variants.order_by("id").first()
    services.hot_swap(
        variant=variant,
        upstream=upstream_config(
            internal_id="secret-rc",
            base_url=upstream.base_url,
            extra_body={"demo_fault": "http_500"},
        ),
    )
    check = services.check_slot(variant=variant)
    assert (check.ok, check.status_code) == (False, 500)
    assert "secret-rc" not in check.reason
    assert upstream.host_port not in check.reason
    assert "kilo/preview-x" in check.reason


def test_a_slot_without_a_checkpoint_cannot_be_tested():
    experiment = make_experiment()
    variant = services.add_variant(experiment=experiment, label="empty", weight=1)
    with pytest.raises(services.InvalidInput, match="has no checkpoint to test yet"):
        services.check_slot(variant=variant)
    assert not CheckpointCheck.objects.exists()


def test_the_checker_is_the_callable_the_setting_names(keyed_upstream, settings):
    settings.CHECKPOINT_CHECKER = "tests.test_checkpoint_checks.refusing_checker"
    check = services.check_slot(variant=slot_on(keyed_upstream))
    assert (check.ok, check.reason) == (False, "refused by the test's checker")
    assert keyed_upstream.received == []


def refusing_checker(probe):
    from experiments.probes import CheckOutcome

    return CheckOutcome(False, None, 0, "refused by the test's checker")


def test_a_draft_slot_with_tests_can_still_be_removed(keyed_upstream):
    variant = slot_on(keyed_upstream)
    services.check_slot(variant=variant)
    services.remove_variant(variant=variant)
    assert not CheckpointCheck.objects.exists()
    assert not VariantVersion.objects.filter(variant_id=variant.pk).exists()


# --- activation and the failed test ---------------------------------------------------------


def test_activation_warns_when_a_checkpoints_last_test_failed(keyed_upstream, canary_key):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    services.check_slot(variant=variant)
    [warning] = services.activation_warnings(variant.experiment)
    assert warning.startswith(f"Connection test of slot {variant.label!r}")
    assert "failed at" in warning
    assert "HTTP 401" in warning


def test_a_passing_test_after_a_failed_one_clears_the_warning(keyed_upstream, canary_key):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    services.check_slot(variant=variant)
    services.rotate_key(variant=variant, api_key=PARTNER_API_KEY)
    services.check_slot(variant=variant)
    assert services.activation_warnings(variant.experiment) == []


# --- the admin ---------------------------------------------------------------------------


def test_url(variant) -> str:
    return reverse(
        "admin:experiments_experiment_test_connection", args=[variant.experiment_id, variant.pk]
    )


test_url.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("page", ["hot_swap", "rotate_key"])
def test_checkpoint_pages_offer_test_connection_and_show_the_last_result(
    admin_client, keyed_upstream, canary_key, page
):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    url = hot_swap_url(variant) if page == "hot_swap" else rotate_url(variant)
    assert "never tested" in admin_client.get(url).content.decode()
    response = admin_client.post(test_url(variant), {"return_to": page}, follow=True)
    assert response.redirect_chain == [(url, 302)]
    [message] = messages_of(response)
    assert message.startswith(f"Slot {variant.label!r}: connection test failed (HTTP 401, ")
    page_html = response.content.decode()
    assert "✗ failed at" in page_html
    assert "Incorrect API key provided" in page_html
    assert canary_key not in page_html


def test_the_checklist_shows_the_failed_test_and_activation_asks_to_confirm(
    admin_client, keyed_upstream, canary_key
):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    experiment = variant.experiment
    admin_client.post(test_url(variant), {"return_to": "change"})
    page = admin_client.get(change_url(experiment)).content.decode()
    assert "Incorrect API key provided" in page
    transition = reverse(
        "admin:experiments_experiment_transition", args=[experiment.pk, "activate"]
    )
    confirmation = admin_client.post(transition)
    assert confirmation.status_code == 200
    assert "last connection test failed" in confirmation.content.decode()
    experiment.refresh_from_db()
    assert experiment.status == S.DRAFT
    admin_client.post(transition, {"confirmed": "yes"})
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE


def test_the_version_history_shows_each_versions_last_test(admin_client, keyed_upstream):
    variant = slot_on(keyed_upstream)
    services.check_slot(variant=variant)
    page = admin_client.get(change_url(variant.experiment)).content.decode()
    assert 'class="mx-check mx-check-ok"' in page
    assert "✓ HTTP 200" in page


def test_testing_needs_a_checkpoint_permission(client, keyed_upstream):
    client.force_login(staff_with("view_experiment", "change_experiment"))
    variant = slot_on(keyed_upstream)
    assert client.post(test_url(variant)).status_code == 403
    assert not CheckpointCheck.objects.exists()


# --- the commands -------------------------------------------------------------------------


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("experiment", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_check_command_prints_the_result_of_a_passing_test(keyed_upstream):
    variant = slot_on(keyed_upstream)
    out, _ = run("check", str(variant.pk))
    assert out.startswith(f"Connection test of slot {variant.label!r} (")
    assert "passed: HTTP 200, " in out


def test_check_command_fails_with_exit_status_1_and_the_reason(keyed_upstream, canary_key):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("experiment", "check", str(variant.pk), "--json", stdout=out)
    assert failed.value.returncode == 1
    assert "failed: HTTP 401, " in str(failed.value)
    payload = json.loads(out.getvalue())
    assert payload["ok"] is False
    assert (payload["check"]["ok"], payload["check"]["status_code"]) == (False, 401)
    assert canary_key not in out.getvalue()


def test_activate_command_warns_on_stderr_about_a_failed_test(keyed_upstream, canary_key):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    services.check_slot(variant=variant)
    out, err = run("activate", str(variant.experiment_id), "--json")
    assert json.loads(out)["warnings"]
    assert err.startswith(f"WARNING: Connection test of slot {variant.label!r}")
    variant.experiment.refresh_from_db()
    assert variant.experiment.status == S.ACTIVE


def test_show_names_each_current_checkpoints_last_test(keyed_upstream, canary_key):
    variant = slot_on(keyed_upstream, api_key=canary_key)
    services.check_slot(variant=variant)
    out, _ = run("show", str(variant.experiment_id), "--json")
    shown = {v["label"]: v["current_checkpoint"] for v in json.loads(out)["experiment"]["variants"]}
    [other] = set(shown) - {variant.label}
    assert (shown[variant.label]["last_check"]["ok"], shown[other]["last_check"]) == (False, None)
    text, _ = run("show", str(variant.experiment_id))
    assert "LAST TEST" in text and "failed 20" in text and "not tested" in text
