"""The commands' shared conventions (issue #9): how an experiment or a variant is named,
one-line ambiguity and "not found" errors, and one ``--json`` convention everywhere."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from experiments.models import ExperimentStatus, Variant
from gateway.models import GatewayToken
from gateway.tokens import create_token
from tests.factories import ExperimentFactory, UserFactory, VariantFactory, make_experiment
from tests.test_prompt_commands import (  # noqa: F401  (local_store is a fixture)
    attribute,
    conversation,
    local_store,
    store_body,
)

pytestmark = pytest.mark.django_db
S = ExperimentStatus


def run(command: str, *args: str) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def refusal(command: str, *args: str) -> tuple[str, str]:
    """(the one-line reason, stdout) of a command that must fail with exit status 1."""
    out = io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command(command, *args, stdout=out, stderr=io.StringIO())
    assert refused.value.returncode == 1
    assert "\n" not in str(refused.value)
    return str(refused.value), out.getvalue()


def shown_id(reference: str) -> str:
    return json.loads(run("experiment", "show", reference, "--json"))["experiment"]["id"]


def variant_id(reference: str) -> str:
    return json.loads(run("experiment", "weight", reference, "1", "--json"))["variant"]["id"]


# --- experiments -----------------------------------------------------------------------------


def test_an_experiment_is_found_by_its_full_id():
    experiment = make_experiment()
    assert shown_id(str(experiment.pk)) == str(experiment.pk)


@pytest.mark.parametrize("length", [4, 8, 13, 20])
def test_an_experiment_is_found_by_a_unique_prefix_of_its_id(length):
    experiment = ExperimentFactory(pk=uuid.UUID("3f2a9c1e-7b4d-4e5f-8a6b-1c2d3e4f5a6b"))
    ExperimentFactory(pk=uuid.UUID("0a0a0a0a-0000-4000-8000-000000000000"))
    assert shown_id(str(experiment.pk)[:length]) == str(experiment.pk)


def test_a_prefix_may_leave_out_the_dashes():
    experiment = ExperimentFactory(pk=uuid.UUID("3f2a9c1e-7b4d-4e5f-8a6b-1c2d3e4f5a6b"))
    assert shown_id("3f2a9c1e7b4d4e") == str(experiment.pk)


def test_an_experiment_is_found_by_its_public_model_id_the_routing_one_first():
    make_experiment(status=S.COMPLETED, public_model_id="kilo/preview-foo")
    routing = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-foo")
    make_experiment(status=S.DRAFT, public_model_id="kilo/preview-foo")
    assert shown_id("kilo/preview-foo") == str(routing.pk)


def test_a_public_model_id_of_one_experiment_finds_it_whatever_its_status():
    completed = make_experiment(status=S.COMPLETED, public_model_id="kilo/preview-old")
    assert shown_id("kilo/preview-old") == str(completed.pk)


def test_a_public_model_id_of_several_non_routing_experiments_is_ambiguous():
    first = make_experiment(status=S.COMPLETED, public_model_id="kilo/preview-again")
    second = make_experiment(status=S.DRAFT, public_model_id="kilo/preview-again")
    reason, _ = refusal("experiment", "show", "kilo/preview-again")
    assert reason.startswith("'kilo/preview-again' matches 2 experiments: ")
    assert f"{first.pk} (kilo/preview-again, completed)" in reason
    assert f"{second.pk} (kilo/preview-again, draft)" in reason


def test_an_ambiguous_prefix_is_one_line_naming_the_candidates():
    one = ExperimentFactory(pk=uuid.UUID("abcd0001-0000-4000-8000-000000000000"))
    two = ExperimentFactory(pk=uuid.UUID("abcd0002-0000-4000-8000-000000000000"))
    reason, _ = refusal("experiment", "activate", "abcd")
    assert reason == (
        f"'abcd' matches 2 experiments: {one.pk} ({one.public_model_id}, draft); "
        f"{two.pk} ({two.public_model_id}, draft). Give more of the id."
    )


def test_an_unknown_experiment_is_not_found_in_the_same_words_everywhere(local_store):  # noqa: F811
    expected = "No experiment matches 'kilo/nothing'."
    assert refusal("experiment", "show", "kilo/nothing")[0] == expected
    assert refusal("experiment_report", "kilo/nothing")[0] == expected
    assert refusal("prompts", "wipe", "--experiment", "kilo/nothing", "--yes")[0] == expected


def test_the_report_takes_a_public_model_id():
    make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-named")
    report = json.loads(run("experiment_report", "kilo/preview-named", "--json"))
    assert report["report"]["experiment"]["public_model_id"] == "kilo/preview-named"


def test_prompt_wipe_takes_a_public_model_id(local_store):  # noqa: F811
    experiment = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-named")
    attribute(experiment, store_body(local_store, conversation("hello")))
    wiped = json.loads(
        run("prompts", "wipe", "--experiment", "kilo/preview-named", "--yes", "--json")
    )
    assert (wiped["experiment_id"], wiped["wiped"]) == (str(experiment.pk), 1)


# --- variants -----------------------------------------------------------------------------------


def test_a_variant_is_found_by_experiment_and_label():
    experiment = make_experiment(public_model_id="kilo/preview-slots")
    slot_b = experiment.variants.get(label="slot-b")
    assert variant_id("kilo/preview-slots:slot-b") == str(slot_b.pk)
    assert variant_id(f"{str(experiment.pk)[:8]}:slot-b") == str(slot_b.pk)


def test_a_variant_is_found_by_its_id_or_a_unique_prefix():
    variant = VariantFactory(pk=uuid.UUID("5e5e5e5e-1111-4000-8000-000000000000"))
    assert variant_id(str(variant.pk)) == str(variant.pk)
    assert variant_id("5e5e5e5e-11") == str(variant.pk)


def test_an_unknown_label_names_the_experiments_slots():
    experiment = make_experiment(public_model_id="kilo/preview-slots")
    reason, _ = refusal("experiment", "label", "kilo/preview-slots:slot-z", "renamed")
    assert reason == (
        f"No variant matches 'kilo/preview-slots:slot-z': experiment {experiment.pk} has "
        "slots slot-a, slot-b."
    )


def test_an_ambiguous_variant_prefix_names_the_candidates():
    experiment = ExperimentFactory(public_model_id="kilo/preview-v")
    for pk, label in (("77770001", "one"), ("77770002", "two")):
        Variant.objects.create(
            pk=uuid.UUID(f"{pk}-0000-4000-8000-000000000000"),
            experiment=experiment,
            label=label,
            weight=1,
        )
    reason, _ = refusal("experiment", "check", "7777")
    assert reason.startswith("'7777' matches 2 variants: 77770001-")
    assert "(kilo/preview-v:one)" in reason and "(kilo/preview-v:two)" in reason


def test_an_unknown_variant_is_not_found():
    assert refusal("experiment", "remove-variant", "nope")[0] == "No variant matches 'nope'."


# --- one --json convention ------------------------------------------------------------------


def one_json_object(output: str) -> dict:
    assert output.count("\n") == 1 and output.endswith("\n")
    return json.loads(output)


def test_experiment_json_success_and_refusal():
    experiment = make_experiment()
    assert one_json_object(run("experiment", "--json", "show", str(experiment.pk)))["ok"] is True
    reason, out = refusal("experiment", "complete", str(experiment.pk), "--json")
    assert one_json_object(out) == {"ok": False, "error": reason}


def test_experiment_report_json_is_one_object_with_the_report():
    experiment = make_experiment(status=S.ACTIVE)
    payload = one_json_object(run("experiment_report", str(experiment.pk), "--json"))
    assert payload["ok"] is True
    assert {slot["label"] for slot in payload["report"]["slots"]} == {"slot-a", "slot-b"}
    reason, out = refusal("experiment_report", str(experiment.pk), "--json", "--since", "soon")
    assert one_json_object(out) == {"ok": False, "error": reason}


def test_gateway_token_json_create_list_revoke_and_refusal():
    UserFactory(username="dana")
    created = one_json_object(run("gateway_token", "create", "dana", "--name", "ci", "--json"))
    token = GatewayToken.objects.get()
    assert (created["ok"], created["id"], created["user"]) == (True, str(token.pk), "dana")
    assert created["token"].startswith(token.token_prefix)
    listed = one_json_object(run("gateway_token", "list", "--json"))
    assert [row["prefix"] for row in listed["tokens"]] == [token.token_prefix]
    assert "token" not in listed["tokens"][0]
    revoked = one_json_object(run("gateway_token", "revoke", token.token_prefix, "--json"))
    assert (revoked["changed"], revoked["token"]["revoked_at"] is not None) == (True, True)
    reason, out = refusal("gateway_token", "create", "nobody", "--json")
    assert one_json_object(out) == {"ok": False, "error": "No user matches 'nobody'."}


def test_gateway_token_ambiguous_prefix_names_the_candidates():
    first, _ = create_token(user=UserFactory(username="erin"))
    second, _ = create_token(user=UserFactory(username="finn"))
    reason, _ = refusal("gateway_token", "revoke", "mxg_")
    assert reason.startswith("'mxg_' matches several tokens: ")
    assert f"{first.token_prefix}… (erin)" in reason and f"{second.token_prefix}… (finn)" in reason
    assert not GatewayToken.objects.filter(revoked_at__isnull=False).exists()


def test_prompts_json_for_wipe_and_gc(local_store):  # noqa: F811
    experiment = make_experiment()
    attribute(experiment, store_body(local_store, conversation("q")))
    wiped = one_json_object(
        run("prompts", "wipe", "--experiment", str(experiment.pk), "--yes", "--json")
    )
    assert (wiped["ok"], wiped["wiped"], wiped["already_deleted"]) == (True, 1, 0)
    collected = one_json_object(run("prompts", "gc", "--dry-run", "--json"))
    assert (collected["ok"], collected["dry_run"], collected["grace_minutes"]) == (True, True, 60)
    reason, out = refusal("prompts", "gc", "--grace-minutes", "1", "--json")
    assert one_json_object(out) == {"ok": False, "error": reason}


def test_sync_experiment_cache_json_refusal(settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # the discard port: nothing listens
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": settings.REDIS_URL,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        }
    }
    reason, out = refusal("sync_experiment_cache", "--json")
    assert reason.startswith("Cannot reach the cache (Redis)")
    assert one_json_object(out) == {"ok": False, "error": reason}


def test_check_json_failure_carries_the_result(keyed_upstream, canary_key):
    experiment = make_experiment(base_url=keyed_upstream.base_url, api_key=canary_key)
    variant = experiment.variants.order_by("id").first()
    reason, out = refusal(
        "experiment", "check", f"{experiment.public_model_id}:{variant.label}", "--json"
    )
    payload = one_json_object(out)
    assert (payload["ok"], payload["error"], payload["check"]["status_code"]) == (
        False,
        reason,
        401,
    )
