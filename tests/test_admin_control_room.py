"""The experiment's change page as its control room (issue #9): lifecycle buttons, the
readiness checklist, confirmations, traffic on the changelist, and slot editing in one
submit with every error shown at once, in words a person uses."""

from __future__ import annotations

import html
import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from experiments import crypto, services
from experiments.models import Experiment, ExperimentStatus, Variant
from tests.factories import (
    ExperimentFactory,
    ExperimentRequestFactory,
    GatewayUsageFactory,
    VariantFactory,
    make_experiment,
    upstream_config,
)
from tests.test_admin import (
    ADD,
    CHANGELIST,
    add_form_data,
    change_form_data,
    change_url,
    hot_swap_url,
    messages_of,
    rotate_url,
    staff_with,
)

S = ExperimentStatus
pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(admin_client):
    return admin_client


def transition_url(experiment: Experiment, action: str) -> str:
    return reverse("admin:experiments_experiment_transition", args=[experiment.pk, action])


def buttons_on(client, experiment: Experiment) -> list[str]:
    page = client.get(change_url(experiment)).content.decode()
    return re.findall(r'class="mx-transition mx-transition-(\w+)"', page)


def checklist_on(client, experiment: Experiment) -> list[str]:
    """The checklist rows as text: "✓ At least two slots — 2 slots"."""
    page = client.get(change_url(experiment)).content.decode()
    rows = re.findall(r'<li class="mx-(?:ok|not-ok)[^"]*">(.*?)</li>', page, re.S)
    return [
        html.unescape(" ".join(re.sub(r"<[^>]+>", " ", row).split()))
        .replace("Test connection", "")
        .strip()
        for row in rows
    ]


# --- lifecycle buttons --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "archived", "buttons"),
    [
        (S.DRAFT, False, ["activate", "archive"]),
        (S.ACTIVE, False, ["pause", "complete"]),
        (S.PAUSED, False, ["activate", "complete", "archive"]),
        (S.COMPLETED, False, ["archive"]),
        (S.COMPLETED, True, ["unarchive"]),
        (S.DRAFT, True, ["unarchive"]),
    ],
)
def test_change_page_offers_only_the_transitions_the_status_allows(
    staff_client, status, archived, buttons
):
    experiment = make_experiment(status=status, is_archived=archived)
    assert buttons_on(staff_client, experiment) == buttons


def test_a_paused_experiment_offers_resume(staff_client):
    experiment = make_experiment(status=S.PAUSED)
    assert ">Resume</button>" in staff_client.get(change_url(experiment)).content.decode()


@pytest.mark.parametrize("codenames", [("view_experiment",), ("change_experiment",)])
def test_no_lifecycle_buttons_without_the_transition_permission(client, codenames):
    client.force_login(staff_with(*codenames))
    assert buttons_on(client, make_experiment()) == []


def test_activate_button_activates_through_the_service_and_records_who(staff_client):
    experiment = make_experiment(name="Ready")
    response = staff_client.post(transition_url(experiment, "activate"), follow=True)
    assert response.redirect_chain == [(change_url(experiment), 302)]
    assert messages_of(response) == ["Ready: Activated (draft → active)."]
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE
    entry = LogEntry.objects.get(object_id=str(experiment.pk))
    assert (entry.change_message, entry.user.username) == ("Activated (draft → active).", "admin")


def test_pause_button_pauses(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    staff_client.post(transition_url(experiment, "pause"))
    experiment.refresh_from_db()
    assert experiment.status == S.PAUSED


def test_a_refused_transition_shows_the_service_reason_and_changes_nothing(staff_client):
    experiment = ExperimentFactory(name="Empty")
    response = staff_client.post(transition_url(experiment, "activate"), follow=True)
    [message] = messages_of(response)
    assert message.startswith("Empty: Cannot activate: needs at least two slots (has 0)")
    experiment.refresh_from_db()
    assert experiment.status == S.DRAFT


def test_complete_asks_for_confirmation_naming_that_the_id_stops_routing(staff_client):
    experiment = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-done")
    page = staff_client.get(transition_url(experiment, "complete")).content.decode()
    assert "&#x27;kilo/preview-done&#x27; stops routing to this experiment at once" in page
    assert "cannot be resumed" in page
    assert 'name="confirmed" value="yes"' in page
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE


def test_complete_posted_without_confirmation_changes_nothing(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    response = staff_client.post(transition_url(experiment, "complete"))
    assert response.status_code == 200
    assert "stops routing" in response.content.decode()
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE
    assert not LogEntry.objects.filter(object_id=str(experiment.pk)).exists()


def test_confirmed_complete_completes(staff_client):
    experiment = make_experiment(status=S.PAUSED, name="Over")
    response = staff_client.post(
        transition_url(experiment, "complete"), {"confirmed": "yes"}, follow=True
    )
    assert messages_of(response) == ["Over: Completed (paused → completed)."]
    experiment.refresh_from_db()
    assert experiment.status == S.COMPLETED


def test_archive_of_a_paused_experiment_confirms_that_the_id_keeps_not_routing(staff_client):
    experiment = make_experiment(status=S.PAUSED, public_model_id="kilo/held")
    page = staff_client.get(transition_url(experiment, "archive")).content.decode()
    assert "leaves the default experiment list" in page
    assert "&#x27;kilo/held&#x27; does not route" in page
    staff_client.post(transition_url(experiment, "archive"), {"confirmed": "yes"})
    experiment.refresh_from_db()
    assert experiment.is_archived


def test_transition_page_needs_the_transition_permission(client):
    client.force_login(staff_with("view_experiment", "change_experiment"))
    experiment = make_experiment()
    assert client.post(transition_url(experiment, "activate")).status_code == 403
    experiment.refresh_from_db()
    assert experiment.status == S.DRAFT


def test_transition_page_also_needs_seeing_the_experiment(client):
    client.force_login(staff_with("transition_experiment"))
    experiment = make_experiment()
    assert client.post(transition_url(experiment, "activate")).status_code == 403
    experiment.refresh_from_db()
    assert experiment.status == S.DRAFT


def test_unknown_transition_is_not_found(staff_client):
    assert staff_client.post(transition_url(make_experiment(), "explode")).status_code == 404


def test_bulk_complete_asks_for_confirmation_first(staff_client):
    first, second = make_experiment(status=S.ACTIVE), make_experiment(status=S.PAUSED)
    response = staff_client.post(
        reverse(CHANGELIST) + "?archived=all",
        {"action": "complete", "_selected_action": [str(first.pk), str(second.pk)]},
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert page.count("stops routing to this experiment at once") == 2
    assert {e.status for e in Experiment.objects.all()} == {S.ACTIVE, S.PAUSED}


# --- the readiness checklist --------------------------------------------------------------


def test_checklist_shows_every_unmet_condition_with_its_reason(staff_client):
    experiment = ExperimentFactory(public_model_id="kilo/new")
    VariantFactory(experiment=experiment, label="only", weight=1)
    assert checklist_on(staff_client, experiment) == [
        "✗ At least two slots — needs at least two slots (has 1)",
        "✓ Positive weights — weights 1",
        "✗ A checkpoint in every slot — no checkpoint loaded in: only",
        f"✓ Partner keys open with the encryption key in use here — key "
        f"{crypto.key_fingerprint()}, from BYOK_ENCRYPTION_KEY",
        "✓ No other active or paused experiment on 'kilo/new' — the id is free",
    ]


def test_checklist_lists_the_connection_test_of_every_checkpoint(staff_client):
    experiment = make_experiment()
    rows = checklist_on(staff_client, experiment)
    tests = [row for row in rows if "Connection test of slot" in row]
    assert [row.split(" (")[0] for row in tests] == [
        "✗ Connection test of slot 'slot-a'",
        "✗ Connection test of slot 'slot-b'",
    ]
    assert all(row.endswith("never tested (activation asks to confirm)") for row in tests)


def test_checklist_names_the_experiment_holding_the_public_id(staff_client):
    make_experiment(status=S.ACTIVE, public_model_id="kilo/taken", name="Incumbent")
    experiment = make_experiment(public_model_id="kilo/taken")
    assert (
        "✗ No other active or paused experiment on 'kilo/taken' — 'Incumbent' is active on it; "
        "complete it first" in checklist_on(staff_client, experiment)
    )


def test_checklist_shows_a_checkpoint_encrypted_under_another_key(staff_client, settings):
    experiment = make_experiment()
    slot = experiment.variants.order_by("id").first()
    running_key, other_key = settings.BYOK_ENCRYPTION_KEY, crypto.generate_key()
    settings.BYOK_ENCRYPTION_KEY = other_key
    services.hot_swap(variant=slot, upstream=upstream_config(), api_key="sk-partner")
    settings.BYOK_ENCRYPTION_KEY = running_key
    [keys] = [row for row in checklist_on(staff_client, experiment) if "Partner keys" in row]
    assert keys.startswith("✗")
    assert crypto.key_fingerprint(other_key) in keys


def test_no_checklist_once_active(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    assert checklist_on(staff_client, experiment) == []


# --- the changelist: traffic of the last 24 hours -------------------------------------------


def _attributed(experiment: Experiment, *, errors: int, ok: int, at=None) -> None:
    version = services.current_version(experiment.variants.order_by("id").first())
    for has_error in [True] * errors + [False] * ok:
        usage = GatewayUsageFactory(
            has_error=has_error,
            status_code=502 if has_error else 200,
            created_at=at or timezone.now(),
        )
        ExperimentRequestFactory(usage=usage, variant_version=version)


def test_changelist_shows_requests_and_error_rate_of_the_last_day_and_a_stats_link(staff_client):
    experiment = make_experiment(status=S.ACTIVE, name="Busy")
    _attributed(experiment, errors=1, ok=3)
    _attributed(experiment, errors=5, ok=5, at=timezone.now() - timedelta(days=2))
    make_experiment(name="Quiet")
    page = staff_client.get(reverse(CHANGELIST)).content.decode()
    busy = re.search(r"<tr>.*?Busy.*?</tr>", page, re.S)[0]
    assert '<td class="field-requests_last_day">4</td>' in busy
    assert '<td class="field-error_rate_last_day">25.0%</td>' in busy
    stats = reverse("admin:experiments_experiment_stats", args=[experiment.pk])
    assert f'href="{stats}" class="mx-stats-link"' in busy
    quiet = re.search(r"<tr>.*?Quiet.*?</tr>", page, re.S)[0]
    assert '<td class="field-requests_last_day">0</td>' in quiet
    assert '<td class="field-error_rate_last_day">—</td>' in quiet


def test_changelist_traffic_columns_cost_one_query_whatever_the_rows(staff_client):
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert staff_client.get(reverse(CHANGELIST)).status_code == 200
        return len(queries)

    for _ in range(2):
        _attributed(make_experiment(status=S.ACTIVE), errors=1, ok=1)
    few = count()
    for _ in range(10):
        experiment = make_experiment()
        services.activate(experiment=experiment)
        _attributed(experiment, errors=1, ok=2)
    assert count() == few


# --- slots: one submit, every error at once, creation order ------------------------------


def test_add_page_offers_two_slot_rows_whose_weight_starts_at_one(staff_client):
    page = staff_client.get(reverse(ADD)).content.decode()
    for index in (0, 1):
        assert re.search(rf'name="variants-{index}-weight"[^>]*value="1"', page) or re.search(
            rf'value="1"[^>]*name="variants-{index}-weight"', page
        )


def test_every_error_of_a_submit_is_shown_at_once_and_nothing_is_created(staff_client):
    body = add_form_data(
        name="  ",
        public_model_id="kilo/has space",
        variants=[("same", "1"), ("same", "0"), ("", "2")],
    )
    response = staff_client.post(reverse(ADD), body)
    assert response.status_code == 200
    form = response.context["adminform"].form
    formset = response.context["inline_admin_formsets"][0].formset
    assert form.errors == {
        "name": ["This field is required."],
        "public_model_id": ["Public model id must not contain spaces."],
    }
    assert [dict(row.errors) for row in formset.forms] == [
        {"label": ["Two slots are labelled 'same'; labels must differ."]},
        {
            "label": ["Two slots are labelled 'same'; labels must differ."],
            "weight": ["Weight must be a positive whole number."],
        },
        {"label": ["This field is required."]},
    ]
    assert not Experiment.objects.exists()
    assert not Variant.objects.exists()


def test_two_slots_are_created_with_the_experiment_in_one_submit(staff_client):
    body = add_form_data(variants=[("control", "1"), ("candidate", "3")])
    body["_continue"] = "Save and continue editing"
    response = staff_client.post(reverse(ADD), body)
    experiment = Experiment.objects.get()
    assert response.url == change_url(experiment)
    assert list(experiment.variants.order_by("created_at").values_list("label", "weight")) == [
        ("control", 1),
        ("candidate", 3),
    ]


def test_slots_are_shown_in_the_order_they_were_created(staff_client):
    experiment = ExperimentFactory()
    # Ids that sort against creation order: bucketing walks ids, people read creation order.
    for label, pk in (("first", "f" * 32), ("second", "0" * 32), ("third", "8" * 32)):
        Variant.objects.create(experiment=experiment, label=label, weight=1, pk=uuid.UUID(pk))
    page = staff_client.get(change_url(experiment)).content.decode()
    shown = re.findall(r'name="variants-\d+-label"[^>]*value="(\w+)"', page)
    assert shown == ["first", "second", "third"]


def test_a_slot_added_by_someone_else_meanwhile_refuses_the_save_and_rolls_it_back(staff_client):
    experiment = make_experiment(name="Before")
    body = change_form_data(experiment, name="After", **{"variants-0-label": "taken"})
    services.add_variant(experiment=experiment, label="taken", weight=1)  # after the page loaded
    response = staff_client.post(change_url(experiment), body, follow=True)
    assert messages_of(response) == [
        "Nothing was saved: A variant labelled 'taken' already exists."
    ]
    experiment.refresh_from_db()
    assert experiment.name == "Before"
    assert sorted(experiment.variants.values_list("label", flat=True)) == [
        "slot-a",
        "slot-b",
        "taken",
    ]


def test_no_hot_swap_or_rotate_links_once_completed(staff_client):
    experiment = make_experiment(status=S.COMPLETED)
    page = staff_client.get(change_url(experiment)).content.decode()
    for variant in experiment.variants.all():
        assert hot_swap_url(variant) not in page
        assert rotate_url(variant) not in page


def test_no_rotate_link_for_a_slot_without_a_checkpoint(staff_client):
    experiment = ExperimentFactory()
    variant = VariantFactory(experiment=experiment)
    page = staff_client.get(change_url(experiment)).content.decode()
    assert hot_swap_url(variant) in page
    assert rotate_url(variant) not in page
