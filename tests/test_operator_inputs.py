"""Admin and command inputs (issue 7, item 12): hostile input gets a one-line reason and
changes nothing; exports are safe to open in a spreadsheet; prompts need their own
permission; a refused hot-swap never shows the pasted key back."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from experiments import services
from experiments.models import ExperimentRequest, VariantVersion
from experiments.prompts.store import get_prompt_store
from tests.factories import SuperUserFactory, make_experiment, upstream_config
from tests.report_seed import seed_experiment
from tests.test_admin import staff_with
from tests.test_commands import db_state, refusal, run

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    client.force_login(SuperUserFactory())
    return client


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"deeper": value}
    return value


# --- NUL bytes in filters -----------------------------------------------------------------


def test_request_browser_refuses_a_nul_in_the_client_request_id_filter(admin_client):
    experiment = make_experiment()
    response = admin_client.get(
        reverse("admin:experiments_experiment_requests", args=[experiment.pk]),
        {"client_request_id": "req\x00-1"},
    )
    assert response.status_code == 400
    assert response.context["error"] == "The client request id filter contains a NUL character."


def test_feedback_join_refuses_a_nul_in_a_pasted_id(admin_client):
    experiment = make_experiment()
    response = admin_client.post(
        reverse("admin:experiments_experiment_feedback", args=[experiment.pk]),
        {"ids": "req-1\nreq\x00-2"},
    )
    assert response.status_code == 400
    assert response.context["error"] == (
        "A client request id contains a NUL character; nothing was looked up."
    )


def test_changelist_filter_with_a_nul_is_reset_with_a_reason(admin_client):
    make_experiment()
    changelist = reverse("admin:experiments_experiment_changelist")
    response = admin_client.get(changelist + "?status__exact=%00", follow=True)
    assert response.redirect_chain == [(changelist, 302)]
    assert [str(m) for m in get_messages(response.wsgi_request)] == [
        "A filter contained a NUL character; filters were reset."
    ]


# --- upstream documents -------------------------------------------------------------------

HOSTILE_UPSTREAMS = pytest.mark.parametrize(
    ("document", "reason"),
    [
        (
            json.dumps(upstream_config(internal_id="rc\x00x")),
            "Internal model id must not contain a NUL character.",
        ),
        (
            json.dumps({**upstream_config(), "extra_body": {"a\x00": 1}}),
            "Extra body must not have a key containing a NUL character.",
        ),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            json.dumps({**upstream_config(), "extra_body": nested(40)}),
            "is nested more than 32 levels deep",
        ),
    ],
    ids=["nul-in-value", "nul-in-key", "deeper-than-the-parser", "deeper-than-allowed"],
)


@HOSTILE_UPSTREAMS
def test_swap_refuses_a_hostile_upstream_file_in_one_line_and_changes_nothing(
    tmp_path, document, reason
):
    variant = make_experiment().variants.first()
    path = tmp_path / "upstream.json"
    path.write_text(document)
    before = db_state()
    assert reason in refusal("swap", str(variant.pk), "--upstream-file", str(path))
    assert db_state() == before


@HOSTILE_UPSTREAMS
def test_hot_swap_page_refuses_a_hostile_upstream_next_to_the_field(admin_client, document, reason):
    variant = make_experiment().variants.first()
    response = admin_client.post(
        reverse("admin:experiments_experiment_hot_swap", args=[variant.experiment_id, variant.pk]),
        {"upstream": document, "api_key": ""},
    )
    assert response.status_code == 200
    errors = response.context["form"].errors["upstream"]
    assert any(reason.split(": ")[-1] in error for error in errors), errors
    assert VariantVersion.objects.filter(variant=variant).count() == 1


# --- CSV export ---------------------------------------------------------------------------


def test_csv_report_neutralises_cells_a_spreadsheet_would_run_as_formulas():
    experiment = services.create_experiment(public_model_id="kilo/preview-csv", name="CSV")
    typed = {"=HYPERLINK(1)": "\tcmd", "+1": "=cmd", "-1": "-cmd", "@SUM(1)": "\rcmd"}
    for label, internal_id in typed.items():
        variant = services.add_variant(experiment=experiment, label=label, weight=1)
        services.hot_swap(
            variant=variant, upstream=upstream_config(internal_id=internal_id), api_key="sk-x"
        )
    out, _ = run(str(experiment.pk), "--format", "csv", command="experiment_report")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {row["slot"]: row["internal_id"] for row in rows} == {
        f"'{label}": f"'{internal_id}" for label, internal_id in typed.items()
    }
    assert {row["requests"] for row in rows} == {"0"}  # numbers stay numbers


# --- prompts need their own permission ----------------------------------------------------

PROMPT_TEXT = "a private question only prompt readers may see"


@pytest.fixture
def stored_prompt(tmp_path, settings):
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    seeded = seed_experiment(subjects=3, requests=3)
    body = {"model": "kilo/preview-foo", "messages": [{"role": "user", "content": PROMPT_TEXT}]}
    sha256 = get_prompt_store().put(json.dumps(body, separators=(",", ":")).encode())
    row = seeded.requests[0]
    ExperimentRequest.objects.filter(usage_id=row.usage_id).update(request_body_sha256=sha256)
    return reverse(
        "admin:experiments_experiment_request_detail", args=[seeded.experiment.pk, row.usage_id]
    )


def test_viewer_without_the_prompt_permission_is_told_prompts_need_it(client, stored_prompt):
    client.force_login(staff_with("view_experiment"))
    response = client.get(stored_prompt)
    page = response.content.decode()
    assert response.status_code == 200
    assert PROMPT_TEXT not in page
    assert "Reading prompts needs its own permission" in page
    assert "experiments.view_prompt" in page


def test_prompt_permission_lets_a_viewer_read_the_prompt(client, stored_prompt):
    client.force_login(staff_with("view_experiment", "view_prompt"))
    assert PROMPT_TEXT in client.get(stored_prompt).content.decode()


# --- a refused form never shows the pasted key ----------------------------------------------


@pytest.mark.parametrize(
    "pasted",
    [
        lambda key: {**upstream_config(internal_id="rc-kept"), "api_key": key},
        lambda key: upstream_config(internal_id="rc-kept", base_url=key),
        lambda key: {
            **upstream_config(internal_id="rc-kept", base_url="ftp://partner.example"),
            "extra_body": {"authorization": f"Bearer {key}"},
        },
        lambda key: '{"internal_id": "rc-kept", "base_url": "' + key,
    ],
    ids=["as-api_key-field", "as-base_url", "inside-extra_body", "in-unreadable-json"],
)
def test_key_pasted_into_a_refused_hot_swap_is_never_shown_back(admin_client, canary_key, pasted):
    variant = make_experiment().variants.first()
    upstream = pasted(canary_key)
    response = admin_client.post(
        reverse("admin:experiments_experiment_hot_swap", args=[variant.experiment_id, variant.pk]),
        {
            "upstream": upstream if isinstance(upstream, str) else json.dumps(upstream),
            "api_key": canary_key,
        },
    )
    assert response.status_code == 200 and response.context["form"].errors
    assert canary_key not in response.content.decode()
    assert VariantVersion.objects.filter(variant=variant).count() == 1


def test_refused_hot_swap_still_shows_the_fields_that_were_fine(admin_client, canary_key):
    variant = make_experiment().variants.first()
    response = admin_client.post(
        reverse("admin:experiments_experiment_hot_swap", args=[variant.experiment_id, variant.pk]),
        {"upstream": json.dumps(upstream_config(internal_id="rc-kept", base_url=canary_key))},
    )
    assert "rc-kept" in response.content.decode()


def test_key_pasted_into_a_refused_rotation_is_never_shown_back(admin_client, canary_key):
    variant = make_experiment().variants.first()
    response = admin_client.post(
        reverse(
            "admin:experiments_experiment_rotate_key", args=[variant.experiment_id, variant.pk]
        ),
        {"api_key": f"{canary_key} pasted twice {canary_key}"},  # refused: not one word
    )
    assert response.status_code == 200 and response.context["form"].errors
    assert canary_key not in response.content.decode()
