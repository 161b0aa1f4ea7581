"""The control slot (issue 10): the first-created slot by default, set in the admin and with
``manage.py experiment set-control``, in any status but completed, recorded in the history;
bad input changes nothing."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from experiments import selectors, services
from experiments.models import ExperimentStatus, Variant
from tests.factories import SuperUserFactory, UserFactory, make_experiment
from tests.test_admin import change_form_data, change_url, messages_of

pytestmark = pytest.mark.django_db
S = ExperimentStatus


def control_label(experiment) -> str | None:
    slot = selectors.control_slot(experiment)
    return slot.label if slot else None


def marked(experiment) -> list[str]:
    return list(
        Variant.objects.filter(experiment=experiment, is_control=True).values_list(
            "label", flat=True
        )
    )


def history(experiment) -> list[str]:
    return list(
        LogEntry.objects.filter(object_id=str(experiment.pk))
        .order_by("action_time", "id")
        .values_list("change_message", flat=True)
    )


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("experiment", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def refusal(*args: str) -> tuple[str, str]:
    out = io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command("experiment", *args, stdout=out, stderr=io.StringIO())
    assert refused.value.returncode == 1
    assert "\n" not in str(refused.value)
    return str(refused.value), out.getvalue()


# --- the default and the rule ------------------------------------------------------------


def test_the_first_created_slot_is_the_control_by_default():
    experiment = make_experiment(weights=(1, 1, 1))
    # Creation order, not id order (ids decide bucketing and are random).
    first = experiment.variants.order_by("created_at", "id").first()
    assert selectors.control_slot(experiment) == first
    assert marked(experiment) == []
    later = experiment.variants.order_by("created_at", "id").last()
    Variant.objects.filter(pk=first.pk).update(created_at=timezone.now() + timedelta(days=1))
    assert selectors.control_slot(experiment) != first
    assert selectors.control_slot(experiment).label in {"slot-b", later.label}


def test_an_experiment_without_slots_has_no_control():
    experiment = make_experiment(weights=())
    assert selectors.control_slot(experiment) is None


def test_the_database_keeps_one_marked_control_per_experiment():
    experiment = make_experiment(weights=(1, 1))
    Variant.objects.filter(experiment=experiment).update(is_control=False)
    first, second = experiment.variants.order_by("created_at", "id")
    Variant.objects.filter(pk=first.pk).update(is_control=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        Variant.objects.filter(pk=second.pk).update(is_control=True)


@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED])
def test_set_control_in_any_status_but_completed(status):
    experiment = make_experiment(status=status, weights=(1, 1, 1))
    services.set_control(variant=experiment.variants.get(label="slot-c"))
    assert control_label(experiment) == "slot-c"
    services.set_control(variant=experiment.variants.get(label="slot-b"))
    assert control_label(experiment) == "slot-b"
    assert marked(experiment) == ["slot-b"]
    assert history(experiment)[-2:] == [
        "Control slot: 'slot-c' (was 'slot-a').",
        "Control slot: 'slot-b' (was 'slot-c').",
    ]


def test_set_control_moves_no_routing_generation():
    from experiments import routing_cache

    experiment = make_experiment(status=S.ACTIVE)
    before = routing_cache.read_generation()
    services.set_control(variant=experiment.variants.get(label="slot-b"))
    assert routing_cache.read_generation() == before


def test_completed_experiment_refuses_and_keeps_its_control():
    experiment = make_experiment(status=S.COMPLETED)
    entries = history(experiment)
    with pytest.raises(services.StructureLocked, match="experiment is completed"):
        services.set_control(variant=experiment.variants.get(label="slot-b"))
    assert control_label(experiment) == "slot-a" and marked(experiment) == []
    assert history(experiment) == entries


def test_removing_the_control_slot_falls_back_to_the_first_slot():
    experiment = make_experiment(weights=(1, 1, 1))
    services.set_control(variant=experiment.variants.get(label="slot-c"))
    services.remove_variant(variant=experiment.variants.get(label="slot-c"))
    assert control_label(experiment) == "slot-a"


# --- the command ---------------------------------------------------------------------------


def test_set_control_command_by_experiment_and_label_with_who_in_history():
    experiment = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-ctl")
    UserFactory(username="analyst")
    result = json.loads(run("set-control", "kilo/preview-ctl:slot-b", "--json", "--by", "analyst"))
    slot_b = experiment.variants.get(label="slot-b")
    assert result == {
        "ok": True,
        "changed": True,
        "variant": {
            "id": str(slot_b.pk),
            "experiment_id": str(experiment.pk),
            "label": "slot-b",
            "weight": 1,
            "is_control": True,
        },
    }
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.user.username == "analyst"
    assert entry.change_message == "Control slot: 'slot-b' (was 'slot-a')."
    again = run("set-control", str(slot_b.pk))
    assert "nothing to do; already the control" in again
    shown = json.loads(run("show", str(experiment.pk), "--json"))["experiment"]["variants"]
    assert [(v["label"], v["is_control"]) for v in shown] == [
        ("slot-a", False),
        ("slot-b", True),
    ]
    assert "slot-b (control)" in run("show", str(experiment.pk))


def test_set_control_command_refuses_a_completed_experiment_and_changes_nothing():
    experiment = make_experiment(status=S.COMPLETED, public_model_id="kilo/preview-done")
    entries = history(experiment)
    reason, out = refusal("set-control", "kilo/preview-done:slot-b", "--json")
    assert reason == (
        "Cannot change the control slot: experiment is completed. A completed experiment's "
        "comparisons stay as they were."
    )
    assert json.loads(out) == {"ok": False, "error": reason}
    assert control_label(experiment) == "slot-a" and history(experiment) == entries


def test_set_control_command_names_the_slots_for_an_unknown_label():
    experiment = make_experiment(public_model_id="kilo/preview-typo")
    reason, _ = refusal("set-control", "kilo/preview-typo:slot-z")
    assert reason == (
        f"No variant matches 'kilo/preview-typo:slot-z': experiment {experiment.pk} has "
        "slots slot-a, slot-b."
    )
    assert marked(experiment) == []
    reason, _ = refusal("set-control", "not-a-uuid")
    assert reason == "No variant matches 'not-a-uuid'."


# --- the admin -----------------------------------------------------------------------------


@pytest.fixture
def staff_client(client):
    client.force_login(SuperUserFactory(username="control-admin"))
    return client


@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED])
def test_admin_sets_the_control_and_records_who(staff_client, status):
    experiment = make_experiment(status=status)
    page = staff_client.get(change_url(experiment)).content.decode()
    assert 'name="control"' in page
    slot_b = experiment.variants.get(label="slot-b")
    response = staff_client.post(
        change_url(experiment), change_form_data(experiment, control=str(slot_b.pk))
    )
    assert response.status_code == 302
    assert control_label(experiment) == "slot-b"
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.user.username == "control-admin"
    assert entry.change_message == "Control slot: 'slot-b' (was 'slot-a')."


def test_admin_post_without_the_field_leaves_the_control(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    services.set_control(variant=experiment.variants.get(label="slot-b"))
    body = change_form_data(experiment, name="Renamed")
    assert staff_client.post(change_url(experiment), body).status_code == 302
    assert control_label(experiment) == "slot-b"


def test_admin_refuses_a_slot_of_another_experiment_and_saves_nothing(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    other = make_experiment(public_model_id="kilo/other")
    stranger = other.variants.get(label="slot-b")
    entries = history(experiment)
    body = change_form_data(experiment, name="Must not be saved", control=str(stranger.pk))
    response = staff_client.post(change_url(experiment), body)
    assert response.status_code == 200
    assert "Choose one of this experiment&#x27;s slots as the control." in (
        response.content.decode()
    )
    experiment.refresh_from_db()
    assert experiment.name != "Must not be saved"
    assert control_label(experiment) == "slot-a" and control_label(other) == "slot-a"
    assert marked(experiment) == [] and marked(other) == []
    assert history(experiment) == entries


def test_admin_shows_the_control_read_only_when_completed(staff_client):
    experiment = make_experiment(status=S.COMPLETED)
    page = staff_client.get(change_url(experiment)).content.decode()
    assert 'name="control"' not in page
    assert "Control slot" in page and "slot-a" in page
    slot_b = experiment.variants.get(label="slot-b")
    body = change_form_data(experiment, name="Renamed", control=str(slot_b.pk))
    assert staff_client.post(change_url(experiment), body).status_code == 302
    assert control_label(experiment) == "slot-a"


def test_admin_refusal_by_a_race_saves_nothing(staff_client):
    """The experiment was completed after the page loaded: the posted control is refused
    by the service and the whole save rolls back, with the reason shown."""
    experiment = make_experiment(status=S.ACTIVE)
    slot_b = experiment.variants.get(label="slot-b")
    # The form the staff member loaded while it was active…
    body = change_form_data(experiment, control=str(slot_b.pk))
    services.complete(experiment=experiment)
    # …posted after completion: control is read-only now, so it is ignored, not applied.
    response = staff_client.post(change_url(experiment), body, follow=True)
    assert response.status_code == 200
    assert control_label(experiment) == "slot-a"
    assert messages_of(response)


def test_admin_view_only_user_sees_the_control(client):
    from django.contrib.auth.models import Permission

    experiment = make_experiment(status=S.ACTIVE)
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_experiment"))
    client.force_login(viewer)
    page = client.get(reverse("admin:experiments_experiment_change", args=[experiment.pk]))
    assert page.status_code == 200
    content = page.content.decode()
    assert "Control slot" in content and 'name="control"' not in content
