"""The Django admin: a thin skin over experiments.services (issue #2, "Django admin")."""

from __future__ import annotations

import json
import logging

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from experiments import routing_cache, selectors, services
from experiments.models import Experiment, ExperimentStatus, Variant, VariantVersion
from tests.factories import (
    ExperimentFactory,
    StaffUserFactory,
    SuperUserFactory,
    UserFactory,
    VariantFactory,
    make_experiment,
    upstream_config,
)

S = ExperimentStatus
pytestmark = pytest.mark.django_db

CHANGELIST = "admin:experiments_experiment_changelist"
ADD = "admin:experiments_experiment_add"


def change_url(experiment: Experiment) -> str:
    return reverse("admin:experiments_experiment_change", args=[experiment.pk])


def history_url(experiment: Experiment) -> str:
    return reverse("admin:experiments_experiment_history", args=[experiment.pk])


def hot_swap_url(variant: Variant) -> str:
    return reverse(
        "admin:experiments_experiment_hot_swap", args=[variant.experiment_id, variant.pk]
    )


def rotate_url(variant: Variant) -> str:
    return reverse(
        "admin:experiments_experiment_rotate_key", args=[variant.experiment_id, variant.pk]
    )


def staff_with(*codenames: str):
    user = StaffUserFactory()
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="experiments", codename__in=codenames)
    )
    return user


@pytest.fixture
def superuser():
    return SuperUserFactory()


@pytest.fixture
def staff_client(client, superuser):
    client.force_login(superuser)
    return client


def change_form_data(experiment: Experiment, **overrides) -> dict[str, str]:
    """The POST body of the change page as the browser would send it, unchanged."""
    variants = list(experiment.variants.order_by("id"))
    body = {
        "name": experiment.name,
        "description": experiment.description,
        "variants-TOTAL_FORMS": str(len(variants)),
        "variants-INITIAL_FORMS": str(len(variants)),
        "variants-MIN_NUM_FORMS": "0",
        "variants-MAX_NUM_FORMS": "1000",
        "_continue": "Save",
    }
    if experiment.status == S.DRAFT:
        body["public_model_id"] = experiment.public_model_id
    for index, variant in enumerate(variants):
        body[f"variants-{index}-id"] = str(variant.pk)
        body[f"variants-{index}-experiment"] = str(experiment.pk)
        body[f"variants-{index}-label"] = variant.label
        if experiment.status == S.DRAFT:
            body[f"variants-{index}-weight"] = str(variant.weight)
    body.update(overrides)
    return body


def add_form_data(name="Preview foo", public_model_id="kilo/preview-foo", variants=()):
    body = {
        "name": name,
        "public_model_id": public_model_id,
        "description": "",
        "variants-TOTAL_FORMS": str(len(variants)),
        "variants-INITIAL_FORMS": "0",
        "variants-MIN_NUM_FORMS": "0",
        "variants-MAX_NUM_FORMS": "1000",
    }
    for index, (label, weight) in enumerate(variants):
        body[f"variants-{index}-label"] = label
        body[f"variants-{index}-weight"] = str(weight)
    return body


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def run_action(client, action: str, *experiments: Experiment, query: str = "?archived=all"):
    """Run a changelist action; complete and archive are confirmed on their page first."""
    body = {"action": action, "_selected_action": [str(e.pk) for e in experiments]}
    if action in ("complete", "archive"):
        body["post"] = "yes"
    return client.post(reverse(CHANGELIST) + query, body, follow=True)


# --- changelist ----------------------------------------------------------------------


def test_changelist_shows_name_public_id_status_badge_and_variant_count(staff_client):
    experiment = make_experiment(weights=(1, 2, 3), name="Foo trial", public_model_id="kilo/foo")
    page = staff_client.get(reverse(CHANGELIST)).content.decode()
    assert "Foo trial" in page
    assert "kilo/foo" in page
    assert 'class="mx-status mx-status-draft"' in page
    assert f'<td class="field-variant_count">{experiment.variants.count()}</td>' in page


def test_changelist_hides_archived_experiments_by_default(staff_client):
    ExperimentFactory(name="Visible one")
    ExperimentFactory(name="Archived one", is_archived=True)
    page = staff_client.get(reverse(CHANGELIST)).content.decode()
    assert "Visible one" in page
    assert "Archived one" not in page


@pytest.mark.parametrize(
    ("choice", "visible", "hidden"),
    [("yes", ["Archived one"], ["Visible one"]), ("all", ["Archived one", "Visible one"], [])],
)
def test_archived_filter_shows_archived_experiments(staff_client, choice, visible, hidden):
    ExperimentFactory(name="Visible one")
    ExperimentFactory(name="Archived one", is_archived=True)
    page = staff_client.get(reverse(CHANGELIST), {"archived": choice}).content.decode()
    assert all(name in page for name in visible)
    assert not any(name in page for name in hidden)


@pytest.mark.parametrize("term", ["needle", "kilo/needle"])
def test_changelist_searches_name_and_public_id(staff_client, term):
    ExperimentFactory(name="The needle experiment", public_model_id="kilo/needle-1")
    ExperimentFactory(name="Haystack", public_model_id="kilo/hay")
    page = staff_client.get(reverse(CHANGELIST), {"q": term}).content.decode()
    assert "The needle experiment" in page
    assert "Haystack" not in page


def _changelist_query_count(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(reverse(CHANGELIST)).status_code == 200
    return len(queries)


def test_changelist_query_count_does_not_grow_with_rows(staff_client):
    for _ in range(3):
        make_experiment(weights=(1, 1))
    few = _changelist_query_count(staff_client)
    for _ in range(27):
        make_experiment(weights=(1, 1, 1))
    many = _changelist_query_count(staff_client)
    assert Experiment.objects.count() == 30
    assert many == few


# --- actions: the full status matrix -------------------------------------------------

# (status, action) -> (expected status, expected archived, message fragment)
MATRIX = {
    (S.DRAFT, "activate"): (S.ACTIVE, False, "Activated (draft → active)"),
    (S.ACTIVE, "activate"): (S.ACTIVE, False, "already active; nothing changed"),
    (S.PAUSED, "activate"): (S.ACTIVE, False, "Activated (paused → active)"),
    (S.COMPLETED, "activate"): (S.COMPLETED, False, "Cannot activate: experiment is completed"),
    (S.DRAFT, "pause"): (S.DRAFT, False, "Cannot pause: experiment is draft"),
    (S.ACTIVE, "pause"): (S.PAUSED, False, "Paused (active → paused)"),
    (S.PAUSED, "pause"): (S.PAUSED, False, "already paused; nothing changed"),
    (S.COMPLETED, "pause"): (S.COMPLETED, False, "Cannot pause: experiment is completed"),
    (S.DRAFT, "complete"): (S.DRAFT, False, "Cannot complete: experiment is draft"),
    (S.ACTIVE, "complete"): (S.COMPLETED, False, "Completed (active → completed)"),
    (S.PAUSED, "complete"): (S.COMPLETED, False, "Completed (paused → completed)"),
    (S.COMPLETED, "complete"): (S.COMPLETED, False, "already completed; nothing changed"),
    (S.DRAFT, "archive"): (S.DRAFT, True, "Archived (draft → draft, archived)"),
    (S.ACTIVE, "archive"): (S.ACTIVE, False, "Cannot archive: experiment is active"),
    (S.PAUSED, "archive"): (S.PAUSED, True, "Archived (paused → paused, archived)"),
    (S.COMPLETED, "archive"): (S.COMPLETED, True, "Archived (completed → completed, archived)"),
    # unarchive starts from an archived experiment (an active one cannot be archived).
    (S.DRAFT, "unarchive"): (S.DRAFT, False, "Unarchived (draft, archived → draft)"),
    (S.ACTIVE, "unarchive"): (S.ACTIVE, False, "not archived; nothing changed"),
    (S.PAUSED, "unarchive"): (S.PAUSED, False, "Unarchived (paused, archived → paused)"),
    (S.COMPLETED, "unarchive"): (
        S.COMPLETED,
        False,
        "Unarchived (completed, archived → completed)",
    ),
}


@pytest.mark.parametrize(("status", "action"), list(MATRIX), ids=lambda v: str(v))
def test_admin_action_status_matrix(staff_client, status, action):
    archived = action == "unarchive" and status != S.ACTIVE
    experiment = make_experiment(status=status, is_archived=archived, name="Matrix")
    expected_status, expected_archived, fragment = MATRIX[(status, action)]

    response = run_action(staff_client, action, experiment)

    experiment.refresh_from_db()
    assert (experiment.status, experiment.is_archived) == (expected_status, expected_archived)
    reported = messages_of(response)
    assert len(reported) == 1
    assert reported[0].startswith("Matrix: ")
    assert fragment in reported[0]


def test_action_on_many_experiments_reports_each_one(staff_client):
    draft = make_experiment(name="A draft")
    completed = make_experiment(status=S.COMPLETED, name="B completed")
    response = run_action(staff_client, "activate", draft, completed)
    assert messages_of(response) == [
        "A draft: Activated (draft → active).",
        "B completed: Cannot activate: experiment is completed; only draft or paused "
        "experiments can be activated.",
    ]


def test_activation_refusal_names_what_is_missing(staff_client):
    experiment = ExperimentFactory(name="Empty")
    response = run_action(staff_client, "activate", experiment)
    assert any("needs at least two slots (has 0)" in m for m in messages_of(response))
    experiment.refresh_from_db()
    assert experiment.status == S.DRAFT


def test_transition_is_recorded_once_in_history_with_who(staff_client, superuser):
    experiment = make_experiment(name="Logged")
    run_action(staff_client, "activate", experiment)
    entries = LogEntry.objects.filter(object_id=str(experiment.pk))
    assert [e.change_message for e in entries] == ["Activated (draft → active)."]
    assert entries.get().user == superuser
    page = staff_client.get(history_url(experiment)).content.decode()
    assert "Activated (draft → active)." in page
    assert superuser.username in page


# --- change form: create and edit through the services ---------------------------------


def test_add_page_creates_experiment_with_variants_and_logs_each_step_once(staff_client):
    response = staff_client.post(
        reverse(ADD), add_form_data(variants=[("control", 1), ("candidate", 3)])
    )
    assert response.status_code == 302
    experiment = Experiment.objects.get(public_model_id="kilo/preview-foo")
    assert sorted(experiment.variants.values_list("label", "weight")) == [
        ("candidate", 3),
        ("control", 1),
    ]
    assert LogEntry.objects.filter(object_id=str(experiment.pk)).count() == 3
    assert response.url == reverse(CHANGELIST)


def test_add_with_empty_name_shows_error_and_creates_nothing(staff_client):
    response = staff_client.post(reverse(ADD), add_form_data(name="  ", variants=[("a", 1)]))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["name"] == ["This field is required."]
    assert not Experiment.objects.exists()
    assert not Variant.objects.exists()


@pytest.mark.parametrize("weight", ["0", "-1", "abc", "1.5"])
def test_add_with_bad_weight_shows_error_and_creates_nothing(staff_client, weight):
    response = staff_client.post(reverse(ADD), add_form_data(variants=[("a", weight)]))
    assert response.status_code == 200
    assert response.context["inline_admin_formsets"][0].formset.errors[0]["weight"]
    assert not Experiment.objects.exists()


def test_public_id_with_whitespace_is_refused_by_service_next_to_the_field(staff_client):
    response = staff_client.post(reverse(ADD), add_form_data(public_model_id="kilo/ bad"))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["public_model_id"] == [
        "Public model id must not contain spaces."
    ]
    assert not Experiment.objects.exists()


def test_refused_variant_change_rolls_back_the_whole_save(staff_client):
    experiment = make_experiment(name="Before")
    body = change_form_data(experiment, name="After", **{"variants-0-weight": "2000000"})
    response = staff_client.post(change_url(experiment), body)
    assert response.status_code == 200
    formset = response.context["inline_admin_formsets"][0].formset
    assert formset.forms[0].errors["weight"] == ["Weight must be at most 1000000."]
    experiment.refresh_from_db()
    assert experiment.name == "Before"
    assert set(experiment.variants.values_list("weight", flat=True)) == {1}
    assert not LogEntry.objects.filter(object_id=str(experiment.pk)).exists()


def test_draft_weights_labels_and_public_id_are_editable(staff_client):
    experiment = make_experiment()
    first, second = experiment.variants.order_by("id")
    body = change_form_data(
        experiment,
        public_model_id="kilo/renamed",
        **{"variants-0-weight": "5", "variants-1-label": "renamed"},
    )
    assert staff_client.post(change_url(experiment), body).status_code == 302
    experiment.refresh_from_db()
    assert experiment.public_model_id == "kilo/renamed"
    assert list(experiment.variants.order_by("id").values_list("label", "weight")) == [
        (first.label, 5),
        ("renamed", 1),
    ]


def test_draft_variant_can_be_removed_in_the_inline(staff_client):
    experiment = make_experiment(weights=(1, 1, 1))
    body = change_form_data(experiment, **{"variants-2-DELETE": "on"})
    assert staff_client.post(change_url(experiment), body).status_code == 302
    assert experiment.variants.count() == 2


@pytest.mark.parametrize("status", [S.ACTIVE, S.PAUSED, S.COMPLETED])
def test_variants_are_read_only_after_draft(staff_client, status):
    experiment = make_experiment(status=status)
    page = staff_client.get(change_url(experiment)).content.decode()
    assert 'name="variants-0-weight"' not in page
    assert 'name="variants-0-DELETE"' not in page
    assert 'name="variants-__prefix__-label"' not in page  # no "add another" row


@pytest.mark.parametrize("status", [S.ACTIVE, S.PAUSED, S.COMPLETED])
def test_public_id_is_read_only_after_draft(staff_client, status):
    experiment = make_experiment(status=status, public_model_id="kilo/locked")
    page = staff_client.get(change_url(experiment)).content.decode()
    assert 'name="public_model_id"' not in page
    body = change_form_data(experiment, public_model_id="kilo/moved")
    staff_client.post(change_url(experiment), body)
    experiment.refresh_from_db()
    assert experiment.public_model_id == "kilo/locked"


def test_weight_posted_for_active_experiment_is_ignored(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    body = change_form_data(experiment, **{"variants-0-weight": "9"})
    staff_client.post(change_url(experiment), body)
    assert set(experiment.variants.values_list("weight", flat=True)) == {1}


def test_label_is_editable_while_active(staff_client):
    experiment = make_experiment(status=S.ACTIVE)
    body = change_form_data(experiment, **{"variants-0-label": "control"})
    assert staff_client.post(change_url(experiment), body).status_code == 302
    assert experiment.variants.order_by("id").first().label == "control"


def test_label_is_read_only_when_completed(staff_client):
    experiment = make_experiment(status=S.COMPLETED)
    page = staff_client.get(change_url(experiment)).content.decode()
    assert 'name="variants-0-label"' not in page


def test_name_is_editable_when_completed(staff_client):
    experiment = make_experiment(status=S.COMPLETED)
    body = change_form_data(experiment, name="Renamed after the fact")
    assert staff_client.post(change_url(experiment), body).status_code == 302
    experiment.refresh_from_db()
    assert experiment.name == "Renamed after the fact"


def test_change_page_shows_each_variant_share_in_percent(staff_client):
    experiment = make_experiment(weights=(1, 3))
    page = staff_client.get(change_url(experiment)).content.decode()
    assert "25.0%" in page
    assert "75.0%" in page


def test_change_page_links_to_the_experiment_stats_requests_and_feedback_join(staff_client):
    experiment = make_experiment()
    page = staff_client.get(change_url(experiment)).content.decode()
    for name in (
        "admin:experiments_experiment_stats",
        "admin:experiments_experiment_requests",
        "admin:experiments_experiment_feedback",
    ):
        assert f'href="{reverse(name, args=[experiment.pk])}"' in page


def test_change_page_shows_version_history_without_key(staff_client, superuser):
    experiment = make_experiment(base_url="https://partner.example/v1")
    variant = experiment.variants.order_by("id").first()
    services.hot_swap(
        variant=variant,
        upstream=upstream_config(internal_id="rc-two", base_url="https://other.example/v1"),
        by=superuser,
    )
    page = staff_client.get(change_url(experiment)).content.decode()
    assert "rc-two" in page
    assert "other.example" in page
    assert "partner.example" in page
    assert superuser.username in page
    assert "Key configured" in page
    assert page.count('class="mx-current-version"') == 2  # one current row per variant


def test_change_page_links_each_variant_to_hot_swap_and_rotate(staff_client):
    experiment = make_experiment()
    page = staff_client.get(change_url(experiment)).content.decode()
    for variant in experiment.variants.all():
        assert hot_swap_url(variant) in page
        assert rotate_url(variant) in page


# --- delete: drafts only ---------------------------------------------------------------


def test_draft_can_be_deleted_and_deletion_is_logged_once(staff_client):
    experiment = make_experiment()
    delete_url = reverse("admin:experiments_experiment_delete", args=[experiment.pk])
    assert staff_client.get(delete_url).status_code == 200
    assert staff_client.post(delete_url, {"post": "yes"}).status_code == 302
    assert not Experiment.objects.exists()
    assert LogEntry.objects.filter(object_id=str(experiment.pk), action_flag=3).count() == 1


@pytest.mark.parametrize("status", [S.ACTIVE, S.PAUSED, S.COMPLETED])
def test_non_draft_cannot_be_deleted(staff_client, status):
    experiment = make_experiment(status=status)
    delete_url = reverse("admin:experiments_experiment_delete", args=[experiment.pk])
    assert staff_client.post(delete_url, {"post": "yes"}).status_code == 403
    assert Experiment.objects.filter(pk=experiment.pk).exists()


def test_bulk_delete_with_a_non_draft_deletes_nothing_and_names_its_status(staff_client):
    draft = make_experiment(name="Draft one")
    active = make_experiment(status=S.ACTIVE, name="Live one")
    response = run_action(staff_client, "delete_selected", draft, active)
    assert Experiment.objects.count() == 2
    assert any(
        m.startswith("Live one: Cannot delete: experiment is active") for m in messages_of(response)
    )


def test_bulk_delete_of_drafts_deletes_after_confirmation(staff_client):
    drafts = [make_experiment(name="One"), make_experiment(name="Two")]
    confirmation = run_action(staff_client, "delete_selected", *drafts)
    assert confirmation.status_code == 200
    assert Experiment.objects.count() == 2
    response = staff_client.post(
        reverse(CHANGELIST) + "?archived=all",
        {
            "action": "delete_selected",
            "post": "yes",
            "_selected_action": [str(e.pk) for e in drafts],
        },
        follow=True,
    )
    assert not Experiment.objects.exists()
    assert messages_of(response) == ["One: deleted.", "Two: deleted."]


# --- hot-swap and rotate pages -----------------------------------------------------------


def test_hot_swap_page_is_seeded_from_the_current_upstream(staff_client):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    current = selectors.current_version(variant)
    page = staff_client.get(hot_swap_url(variant)).content.decode()
    assert current.internal_id in page
    assert "Key configured (since" in page
    assert "data-django-jsonform" in page


def test_hot_swap_page_without_any_version_says_no_key_yet(staff_client):
    variant = VariantFactory()
    page = staff_client.get(hot_swap_url(variant)).content.decode()
    assert "No key yet" in page


def _swap(client, variant, upstream, api_key=""):
    body = {"upstream": json.dumps(upstream) if not isinstance(upstream, str) else upstream}
    body["api_key"] = api_key
    return client.post(hot_swap_url(variant), body)


def test_hot_swap_with_a_key_inserts_a_version_and_returns_to_the_experiment(staff_client):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    response = _swap(staff_client, variant, upstream_config(internal_id="rc-new"), "sk-new")
    assert response.status_code == 302
    assert response.url == change_url(experiment)
    assert selectors.current_version(variant).internal_id == "rc-new"


def test_hot_swap_without_a_key_reuses_the_previous_ciphertext(staff_client):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    before = selectors.current_version(variant, with_ciphertext=True).encrypted_api_key
    assert _swap(staff_client, variant, upstream_config(internal_id="rc-new")).status_code == 302
    after = selectors.current_version(variant, with_ciphertext=True)
    assert (after.internal_id, after.encrypted_api_key) == ("rc-new", before)


def test_hot_swap_drops_the_blanks_the_editor_sends_for_untouched_optional_fields(staff_client):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    editor_output = {
        **upstream_config(internal_id="rc-editor"),
        "opencode_settings": {"ai_sdk_provider": ""},
        "openclaw_settings": {"api_adapter": "openai-completions"},
        "extra_body": {},
        "remove_from_body": [],
    }
    assert _swap(staff_client, variant, editor_output).status_code == 302
    assert selectors.current_version(variant).upstream == {
        **upstream_config(internal_id="rc-editor"),
        "openclaw_settings": {"api_adapter": "openai-completions"},
    }


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (
            {**upstream_config(), "api_key": "sk-in-json"},
            "'api_key' is not an allowed field: the partner key goes in the key field.",
        ),
        (
            {**upstream_config(), "api_key": ""},
            "'api_key' is not an allowed field: the partner key goes in the key field.",
        ),
        (
            {**upstream_config(), "extra_headers": {"x": "y"}},
            "'extra_headers' is not an allowed field.",
        ),
        (
            upstream_config(base_url="ftp://partner.example/v1"),
            "Base URL must be an http(s) URL with a host, e.g. https://partner.example/v1.",
        ),
        ({"base_url": "https://partner.example/v1"}, "Internal model id is required."),
        (
            {**upstream_config(), "opencode_settings": {"ai_sdk_provider": "acme"}},
            "opencode settings › AI SDK provider must be one of 'anthropic', 'openai', "
            "'openai-compatible', 'openrouter', 'alibaba' or 'mistral'.",
        ),
        ("{not json", "The upstream is not valid JSON."),
    ],
    ids=[
        "api_key",
        "empty_api_key",
        "extra_headers",
        "ftp_url",
        "no_internal_id",
        "bad_enum",
        "not_json",
    ],
)
def test_hot_swap_refuses_bad_upstream_next_to_the_field(staff_client, upstream, expected):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    response = _swap(staff_client, variant, upstream, "sk-would-be-new")
    assert response.status_code == 200
    assert response.context["form"].errors["upstream"] == [expected]
    assert VariantVersion.objects.filter(variant=variant).count() == 1


def test_first_hot_swap_without_a_key_is_refused_on_the_key_field(staff_client):
    variant = VariantFactory()
    response = _swap(staff_client, variant, upstream_config())
    assert response.context["form"].errors["api_key"] == [
        "An API key is required: this variant has no checkpoint yet."
    ]
    assert not VariantVersion.objects.filter(variant=variant).exists()


@pytest.mark.parametrize("page", ["hot_swap", "rotate"])
@pytest.mark.parametrize("method", ["get", "post"])
def test_checkpoint_pages_of_a_completed_experiment_send_back_with_the_reason(
    staff_client, page, method
):
    experiment = make_experiment(status=S.COMPLETED)
    variant = experiment.variants.order_by("id").first()
    url = hot_swap_url(variant) if page == "hot_swap" else rotate_url(variant)
    body = {"upstream": json.dumps(upstream_config()), "api_key": "sk-x"}
    response = getattr(staff_client, method)(url, body if method == "post" else {}, follow=True)
    assert response.redirect_chain == [(change_url(experiment), 302)]
    what = "hot-swap" if page == "hot_swap" else "rotate the key"
    assert messages_of(response) == [f"Cannot {what}: experiment is completed."]
    assert VariantVersion.objects.filter(variant=variant).count() == 1


@pytest.mark.parametrize("encryption_key", ["", "not-base64!", "c2hvcnQ="])
def test_hot_swap_without_usable_encryption_key_shows_error_and_writes_nothing(
    staff_client, settings, encryption_key
):
    variant = VariantFactory()
    settings.BYOK_ENCRYPTION_KEY = encryption_key
    response = _swap(staff_client, variant, upstream_config(), "sk-new")
    assert response.status_code == 200
    assert "BYOK_ENCRYPTION_KEY" in response.context["form"].non_field_errors()[0]
    assert not VariantVersion.objects.filter(variant=variant).exists()
    assert not LogEntry.objects.exists()


def test_rotate_key_inserts_a_version_with_the_same_upstream(staff_client):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    before = selectors.current_version(variant, with_ciphertext=True)
    response = staff_client.post(rotate_url(variant), {"api_key": "sk-rotated"})
    assert response.status_code == 302
    after = selectors.current_version(variant, with_ciphertext=True)
    assert after.pk != before.pk
    assert after.upstream == before.upstream
    assert after.encrypted_api_key != before.encrypted_api_key


def test_rotate_key_without_a_key_is_refused(staff_client):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    response = staff_client.post(rotate_url(variant), {"api_key": " "})
    assert response.context["form"].errors["api_key"] == ["This field is required."]
    assert VariantVersion.objects.filter(variant=variant).count() == 1


def test_rotate_key_without_usable_encryption_key_writes_nothing(staff_client, settings):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    settings.BYOK_ENCRYPTION_KEY = ""
    response = staff_client.post(rotate_url(variant), {"api_key": "sk-rotated"})
    assert "BYOK_ENCRYPTION_KEY is not set" in response.context["form"].non_field_errors()[0]
    assert VariantVersion.objects.filter(variant=variant).count() == 1


def test_hot_swap_and_rotation_appear_in_history_with_who(staff_client, superuser):
    experiment = make_experiment()
    variant = experiment.variants.order_by("id").first()
    _swap(staff_client, variant, upstream_config(internal_id="rc-hist"), "sk-new")
    staff_client.post(rotate_url(variant), {"api_key": "sk-rotated"})
    page = staff_client.get(history_url(experiment)).content.decode()
    label = f"&#x27;{variant.label}&#x27;"
    assert f"Hot-swapped variant {label} to &#x27;rc-hist&#x27; (new key)." in page
    assert f"Rotated the key of variant {label}." in page
    assert LogEntry.objects.filter(object_id=str(experiment.pk), user=superuser).count() == 2


def test_hot_swap_of_a_variant_of_another_experiment_is_not_found(staff_client):
    variant = make_experiment().variants.first()
    other = make_experiment()
    url = reverse("admin:experiments_experiment_hot_swap", args=[other.pk, variant.pk])
    assert staff_client.get(url).status_code == 404


# --- permissions -----------------------------------------------------------------------


@pytest.fixture
def viewer_client(client):
    client.force_login(staff_with("view_experiment"))
    return client


def test_viewer_sees_changelist_change_page_history_and_versions(viewer_client):
    experiment = make_experiment(status=S.ACTIVE, name="Watched")
    services.pause(experiment=experiment)
    assert "Watched" in viewer_client.get(reverse(CHANGELIST)).content.decode()
    page = viewer_client.get(change_url(experiment)).content.decode()
    assert "Key configured" in page
    assert "50.0%" in page
    assert (
        "Paused (active → paused)." in viewer_client.get(history_url(experiment)).content.decode()
    )


def test_viewer_gets_no_inputs_action_buttons_or_checkpoint_links(viewer_client):
    experiment = make_experiment(name="Watched")
    changelist = viewer_client.get(reverse(CHANGELIST)).content.decode()
    assert 'name="action"' not in changelist
    page = viewer_client.get(change_url(experiment)).content.decode()
    assert 'name="name"' not in page
    assert 'name="_save"' not in page
    assert "Hot-swap checkpoint" not in page
    assert "Rotate key" not in page


def test_viewer_posting_a_change_is_forbidden(viewer_client):
    experiment = make_experiment(name="Watched")
    response = viewer_client.post(change_url(experiment), change_form_data(experiment, name="X"))
    assert response.status_code == 403
    experiment.refresh_from_db()
    assert experiment.name == "Watched"


def test_viewer_posting_an_action_is_forbidden(viewer_client):
    experiment = make_experiment()
    response = viewer_client.post(
        reverse(CHANGELIST), {"action": "activate", "_selected_action": [str(experiment.pk)]}
    )
    assert response.status_code == 403
    experiment.refresh_from_db()
    assert experiment.status == S.DRAFT


@pytest.mark.parametrize("page", ["hot_swap", "rotate"])
def test_viewer_cannot_open_or_post_checkpoint_pages(viewer_client, page):
    variant = make_experiment().variants.first()
    url = hot_swap_url(variant) if page == "hot_swap" else rotate_url(variant)
    assert viewer_client.get(url).status_code == 403
    assert viewer_client.post(url, {"upstream": "{}", "api_key": "sk-x"}).status_code == 403
    assert VariantVersion.objects.filter(variant=variant).count() == 1


def test_viewer_cannot_delete_a_draft(viewer_client):
    experiment = make_experiment()
    delete_url = reverse("admin:experiments_experiment_delete", args=[experiment.pk])
    assert viewer_client.post(delete_url, {"post": "yes"}).status_code == 403


def test_transition_permission_allows_actions_but_not_hot_swap(client):
    client.force_login(staff_with("view_experiment", "transition_experiment"))
    experiment = make_experiment(name="Operated")
    response = run_action(client, "activate", experiment)
    assert "Operated: Activated (draft → active)." in messages_of(response)
    variant = experiment.variants.first()
    assert client.get(hot_swap_url(variant)).status_code == 403
    assert client.post(rotate_url(variant), {"api_key": "sk-x"}).status_code == 403
    assert "Hot-swap checkpoint" not in client.get(change_url(experiment)).content.decode()


def test_hot_swap_permission_without_rotate_permission(client):
    client.force_login(staff_with("view_experiment", "hotswap_variant"))
    variant = make_experiment().variants.first()
    assert client.get(hot_swap_url(variant)).status_code == 200
    assert client.post(rotate_url(variant), {"api_key": "sk-x"}).status_code == 403


def test_change_permission_without_transition_permission_has_no_transition_actions(client):
    client.force_login(staff_with("view_experiment", "change_experiment"))
    make_experiment()
    page = client.get(reverse(CHANGELIST)).content.decode()
    assert 'value="activate"' not in page


@pytest.mark.parametrize("page", ["changelist", "change", "hot_swap", "rotate", "history"])
def test_non_staff_is_sent_to_login(client, page):
    user = UserFactory()
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="experiments"))
    client.force_login(user)
    experiment = make_experiment()
    variant = experiment.variants.first()
    url = {
        "changelist": reverse(CHANGELIST),
        "change": change_url(experiment),
        "hot_swap": hot_swap_url(variant),
        "rotate": rotate_url(variant),
        "history": history_url(experiment),
    }[page]
    response = client.get(url)
    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))
    assert client.post(url, {"api_key": "sk-x"}).status_code == 302
    assert VariantVersion.objects.filter(variant=variant).count() == 1


# --- secrets -----------------------------------------------------------------------------


def _admin_pages(experiment: Experiment) -> list[str]:
    urls = [
        reverse(CHANGELIST),
        reverse(CHANGELIST) + "?archived=all",
        change_url(experiment),
        history_url(experiment),
    ]
    if experiment.status == S.DRAFT:
        urls.append(reverse("admin:experiments_experiment_delete", args=[experiment.pk]))
    for variant in experiment.variants.all():
        urls += [hot_swap_url(variant), rotate_url(variant)]
    return urls


@pytest.mark.django_db(transaction=True)
def test_canary_key_never_reaches_pages_logs_or_redis(client, canary_key, caplog):
    caplog.set_level(logging.DEBUG)
    client.force_login(SuperUserFactory())
    experiment = make_experiment(weights=(1, 1))
    first, second = experiment.variants.order_by("id")

    assert (
        _swap(client, first, upstream_config(internal_id="rc-canary"), canary_key).status_code
        == 302
    )
    assert client.post(rotate_url(second), {"api_key": canary_key}).status_code == 302
    # A refused submission must not echo the key back either.
    refused = _swap(client, first, {"internal_id": "x", "base_url": "nope"}, canary_key)
    assert refused.status_code == 200
    assert canary_key not in refused.content.decode()
    run_action(client, "activate", experiment)
    routing_cache.sync_all()  # routing payloads (ciphertext only) into the cache
    experiment.refresh_from_db()

    ciphertexts = [
        value
        for version in VariantVersion.with_ciphertext.filter(variant__experiment=experiment)
        for value in version.encrypted_api_key.values()
    ]
    for url in _admin_pages(experiment):
        page = client.get(url)
        assert page.status_code == 200, url
        html = page.content.decode()
        assert canary_key not in html, url
        assert not [c for c in ciphertexts if c in html], url

    assert caplog.records, "expected some log records to inspect"
    for record in caplog.records:
        assert canary_key not in record.getMessage()
        assert canary_key not in str(record.args)

    from django.conf import settings

    if settings.CACHES["default"]["BACKEND"] == "django_redis.cache.RedisCache":
        _assert_no_redis_value_contains(canary_key.encode())


def _assert_no_redis_value_contains(needle: bytes) -> None:
    from django_redis import get_redis_connection

    redis = get_redis_connection("default")
    keys = list(redis.scan_iter(count=500))
    assert keys, "the routing cache should have written keys"
    for key in keys:
        kind = redis.type(key)
        if kind == b"string":
            values = [redis.get(key)]
        elif kind == b"set":
            values = list(redis.smembers(key))
        elif kind == b"hash":
            values = [v for pair in redis.hgetall(key).items() for v in pair]
        elif kind == b"list":
            values = redis.lrange(key, 0, -1)
        elif kind == b"zset":
            values = [member for member, _ in redis.zrange(key, 0, -1, withscores=True)]
        else:
            values = [redis.dump(key) or b""]
        assert needle not in key
        assert not [v for v in values if v and needle in v], key


def test_rendering_admin_pages_never_selects_the_ciphertext_column(staff_client):
    experiment = make_experiment(weights=(1, 2))
    with CaptureQueriesContext(connection) as queries:
        for url in _admin_pages(experiment):
            assert staff_client.get(url).status_code == 200, url
    selects = [
        q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")
    ]
    assert any("model_experiment_variant_version" in sql for sql in selects)
    assert not [sql for sql in selects if "encrypted_api_key" in sql]
