"""The operator commands: `experiment`, `generate_encryption_key`, `sync_experiment_cache`.

Most tests call the commands in-process with call_command; a few run
`python manage.py ...` in a subprocess to check real exit codes and that a
partner key travels only through the environment.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings

from experiments import crypto, routing_cache
from experiments.models import Experiment, ExperimentStatus, Variant, VariantVersion
from tests.factories import (
    ExperimentFactory,
    UserFactory,
    VariantFactory,
    make_experiment,
    upstream_config,
)

pytestmark = pytest.mark.django_db

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "MX_TEST_PARTNER_KEY"


class TtyInput(io.StringIO):
    """Stands in for an interactive stdin."""

    def isatty(self) -> bool:
        return True


def run(*args: str, command: str = "experiment") -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(command, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def run_json(*args: str) -> dict:
    out, _ = run(*args, "--json")
    assert out.count("\n") == 1  # exactly one JSON object on one line
    return json.loads(out)


def refusal(*args: str) -> str:
    """Run a command that must fail; return its one-line reason."""
    out = io.StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command("experiment", *args, stdout=out, stderr=io.StringIO())
    message = str(excinfo.value)
    assert excinfo.value.returncode != 0
    assert "\n" not in message
    return message


def db_state() -> tuple:
    return (
        list(Experiment.objects.order_by("id").values()),
        list(Variant.objects.order_by("id").values()),
        list(VariantVersion.with_ciphertext.order_by("id").values()),
        LogEntry.objects.count(),
    )


def upstream_file(tmp_path: Path, content: object, name: str = "upstream.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def first_variant(experiment: Experiment) -> Variant:
    return experiment.variants.order_by("id").first()


@pytest.fixture
def partner_key_env(monkeypatch, canary_key):
    monkeypatch.setenv(KEY_ENV, canary_key)
    return KEY_ENV


# --- create / list / show / update / delete -----------------------------------------------


def test_create_prints_only_the_new_id():
    out, _ = run("create", "--public-model-id", "kilo/preview-foo", "--name", "Foo")
    experiment = Experiment.objects.get(pk=uuid.UUID(out.strip()))
    assert out == f"{experiment.pk}\n"
    assert (experiment.status, experiment.public_model_id) == ("draft", "kilo/preview-foo")


def test_create_json_returns_the_draft():
    payload = run_json(
        "create", "--public-model-id", "kilo/p", "--name", "Foo", "--description", "Why"
    )
    assert payload["ok"] is True
    assert payload["experiment"]["status"] == "draft"
    assert payload["experiment"]["description"] == "Why"
    assert Experiment.objects.filter(pk=payload["id"]).exists()


def test_list_hides_archived_unless_all():
    visible = ExperimentFactory(name="Visible")
    hidden = ExperimentFactory(name="Hidden", is_archived=True)
    default_ids = {row["id"] for row in run_json("list")["experiments"]}
    all_ids = {row["id"] for row in run_json("list", "--all")["experiments"]}
    assert default_ids == {str(visible.pk)}
    assert all_ids == {str(visible.pk), str(hidden.pk)}


def test_list_table_is_aligned_in_columns():
    make_experiment(name="A rather long experiment name", public_model_id="kilo/long-public-id")
    ExperimentFactory(name="B", public_model_id="kilo/x", status=ExperimentStatus.DRAFT)
    lines = run("list")[0].splitlines()
    header = lines[0]
    for column in ("STATUS", "VARIANTS", "PUBLIC MODEL ID", "NAME"):
        start = header.index(column)
        for line in lines[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " "


def test_list_json_counts_variants():
    experiment = make_experiment(weights=(1, 2, 3))
    (row,) = run_json("list")["experiments"]
    assert (row["id"], row["variant_count"]) == (str(experiment.pk), 3)


def test_show_lists_variants_in_creation_order_with_share_and_checkpoint():
    experiment = make_experiment(weights=(3, 1), base_url="https://partner.example/v1")
    shown = run_json("show", str(experiment.pk))["experiment"]
    variants = shown["variants"]
    assert [v["label"] for v in variants] == ["slot-a", "slot-b"]
    by_weight = {v["weight"]: v for v in variants}
    assert (by_weight[3]["share_percent"], by_weight[1]["share_percent"]) == (75.0, 25.0)
    checkpoint = by_weight[3]["current_checkpoint"]
    assert checkpoint["base_url_host"] == "partner.example"
    assert checkpoint["key_configured"] is True
    assert checkpoint["id"] == str(VariantVersion.objects.get(variant_id=by_weight[3]["id"]).pk)


def test_show_text_names_fields_shares_and_key_configured():
    experiment = make_experiment(weights=(3, 1), base_url="https://partner.example/v1")
    text = run("show", str(experiment.pk))[0]
    version = VariantVersion.objects.filter(variant__experiment=experiment).first()
    for expected in (experiment.name, "draft", "75.0%", "25.0%", "partner.example", "configured"):
        assert expected in text
    assert str(version.pk) in text and version.internal_id in text


def test_show_marks_a_variant_without_checkpoint():
    experiment = ExperimentFactory()
    VariantFactory(experiment=experiment, label="empty")
    (variant,) = run_json("show", str(experiment.pk))["experiment"]["variants"]
    assert variant["current_checkpoint"] is None
    assert "(no checkpoint)" in run("show", str(experiment.pk))[0]


def test_update_changes_name_description_and_public_id_in_draft():
    experiment = ExperimentFactory()
    run(
        "update",
        str(experiment.pk),
        "--name",
        "New",
        "--description",
        "D",
        "--public-model-id",
        "kilo/new",
    )
    experiment.refresh_from_db()
    assert (experiment.name, experiment.description, experiment.public_model_id) == (
        "New",
        "D",
        "kilo/new",
    )


def test_update_json_returns_the_experiment():
    experiment = ExperimentFactory()
    payload = run_json("update", str(experiment.pk), "--name", "Renamed")
    assert payload["experiment"]["name"] == "Renamed"


def test_update_public_id_refused_after_activation():
    experiment = make_experiment(status=ExperimentStatus.ACTIVE)
    before = db_state()
    message = refusal("update", str(experiment.pk), "--public-model-id", "kilo/other")
    assert "active" in message
    assert db_state() == before


def test_update_without_fields_is_refused():
    experiment = ExperimentFactory()
    assert "Nothing to update" in refusal("update", str(experiment.pk))


def test_delete_with_yes_removes_a_draft():
    experiment = make_experiment()
    out, _ = run("delete", str(experiment.pk), "--yes")
    assert str(experiment.pk) in out
    assert not Experiment.objects.filter(pk=experiment.pk).exists()
    assert not VariantVersion.objects.filter(variant__experiment_id=experiment.pk).exists()


def test_delete_json_reports_the_id():
    experiment = make_experiment()
    assert run_json("delete", str(experiment.pk), "--yes")["id"] == str(experiment.pk)


def test_delete_without_yes_and_without_tty_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    experiment = make_experiment()
    before = db_state()
    assert "--yes" in refusal("delete", str(experiment.pk))
    assert db_state() == before


def test_delete_asks_on_a_tty_and_deletes_on_yes(monkeypatch):
    monkeypatch.setattr(sys, "stdin", TtyInput("yes\n"))
    experiment = make_experiment()
    _, err = run("delete", str(experiment.pk))
    assert "Type 'yes'" in err
    assert not Experiment.objects.filter(pk=experiment.pk).exists()


def test_delete_on_a_tty_keeps_the_experiment_unless_confirmed(monkeypatch):
    monkeypatch.setattr(sys, "stdin", TtyInput("no\n"))
    experiment = make_experiment()
    before = db_state()
    assert "Not confirmed" in refusal("delete", str(experiment.pk))
    assert db_state() == before


@pytest.mark.parametrize("status", ["active", "paused", "completed"])
def test_delete_refused_unless_draft(status):
    experiment = make_experiment(status=status)
    before = db_state()
    assert status in refusal("delete", str(experiment.pk), "--yes")
    assert db_state() == before


# --- variants -----------------------------------------------------------------------------


def test_add_variant_prints_only_the_variant_id():
    experiment = ExperimentFactory()
    out, _ = run("add-variant", str(experiment.pk), "--label", "a", "--weight", "3")
    variant = Variant.objects.get(pk=uuid.UUID(out.strip()))
    assert (variant.experiment_id, variant.label, variant.weight) == (experiment.pk, "a", 3)


def test_add_variant_json_returns_the_variant():
    experiment = ExperimentFactory()
    payload = run_json("add-variant", str(experiment.pk), "--label", "a", "--weight", "2")
    assert payload["variant"] == {
        "id": payload["id"],
        "experiment_id": str(experiment.pk),
        "label": "a",
        "weight": 2,
        "is_control": True,  # the first slot is the control until another is chosen
    }


def test_add_variant_refused_after_activation():
    experiment = make_experiment(status=ExperimentStatus.ACTIVE)
    before = db_state()
    assert "active" in refusal("add-variant", str(experiment.pk), "--label", "c", "--weight", "1")
    assert db_state() == before


def test_remove_variant_in_draft():
    experiment = make_experiment()
    variant = first_variant(experiment)
    out, _ = run("remove-variant", str(variant.pk))
    assert str(variant.pk) in out
    assert not Variant.objects.filter(pk=variant.pk).exists()


def test_remove_variant_json_reports_the_id():
    variant = first_variant(make_experiment())
    assert run_json("remove-variant", str(variant.pk))["id"] == str(variant.pk)


def test_remove_variant_refused_after_activation():
    variant = first_variant(make_experiment(status=ExperimentStatus.PAUSED))
    before = db_state()
    assert "paused" in refusal("remove-variant", str(variant.pk))
    assert db_state() == before


def test_label_renames_a_variant_of_an_active_experiment():
    variant = first_variant(make_experiment(status=ExperimentStatus.ACTIVE))
    out, _ = run("label", str(variant.pk), "renamed")
    variant.refresh_from_db()
    assert variant.label == "renamed" and "renamed" in out


def test_label_json_returns_the_variant():
    variant = first_variant(make_experiment())
    assert run_json("label", str(variant.pk), "x")["variant"]["label"] == "x"


def test_weight_sets_the_weight_in_draft():
    variant = first_variant(make_experiment())
    run("weight", str(variant.pk), "7")
    variant.refresh_from_db()
    assert variant.weight == 7


def test_weight_json_returns_the_variant():
    variant = first_variant(make_experiment())
    assert run_json("weight", str(variant.pk), "5")["variant"]["weight"] == 5


@pytest.mark.parametrize("status", ["active", "paused", "completed"])
def test_weight_refused_unless_draft(status):
    variant = first_variant(make_experiment(status=status))
    before = db_state()
    assert status in refusal("weight", str(variant.pk), "9")
    assert db_state() == before


# --- checkpoints --------------------------------------------------------------------------


def test_swap_from_file_with_key_from_env(tmp_path, partner_key_env, canary_key):
    variant = first_variant(make_experiment(status=ExperimentStatus.ACTIVE))
    path = upstream_file(
        tmp_path, upstream_config(internal_id="rc-9", base_url="https://p.example/v1")
    )
    # p.example answers nothing: this test is about where the key comes from, not the test.
    out, _ = run(
        "swap",
        str(variant.pk),
        "--upstream-file",
        path,
        "--api-key-env",
        partner_key_env,
        "--no-check",
    )
    current = VariantVersion.with_ciphertext.filter(variant=variant).effective_at().first()
    assert current.upstream["internal_id"] == "rc-9"
    assert crypto.decrypt_api_key(current.encrypted_api_key) == canary_key
    assert str(current.pk) in out


def test_swap_from_stdin_without_key_reuses_the_ciphertext(monkeypatch):
    variant = first_variant(make_experiment())
    previous = VariantVersion.with_ciphertext.get(variant=variant)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(upstream_config(internal_id="rc-s"))))
    payload = run_json("swap", str(variant.pk), "--upstream-file", "-")
    current = VariantVersion.with_ciphertext.get(pk=payload["version"]["id"])
    assert payload["version"]["new_key"] is False
    assert current.upstream["internal_id"] == "rc-s"
    assert current.encrypted_api_key == previous.encrypted_api_key


def test_swap_on_a_tty_prompts_for_the_key(tmp_path, monkeypatch, canary_key):
    from experiments.management.commands import experiment as experiment_command

    prompts: list[str] = []
    monkeypatch.setattr(sys, "stdin", TtyInput(""))
    monkeypatch.setattr(
        experiment_command.getpass, "getpass", lambda prompt: prompts.append(prompt) or canary_key
    )
    variant = first_variant(make_experiment())
    run("swap", str(variant.pk), "--upstream-file", upstream_file(tmp_path, upstream_config()))
    current = VariantVersion.with_ciphertext.filter(variant=variant).effective_at().first()
    assert len(prompts) == 1
    assert crypto.decrypt_api_key(current.encrypted_api_key) == canary_key


def test_swap_refused_for_completed_experiment(tmp_path, partner_key_env):
    variant = first_variant(make_experiment(status=ExperimentStatus.COMPLETED))
    before = db_state()
    message = refusal(
        "swap",
        str(variant.pk),
        "--upstream-file",
        upstream_file(tmp_path, upstream_config()),
        "--api-key-env",
        partner_key_env,
    )
    assert "completed" in message
    assert db_state() == before


def test_rotate_key_copies_upstream_and_takes_the_new_key(partner_key_env, canary_key):
    variant = first_variant(make_experiment(status=ExperimentStatus.PAUSED))
    previous = VariantVersion.objects.get(variant=variant)
    payload = run_json(
        "rotate-key", str(variant.pk), "--api-key-env", partner_key_env, "--no-check"
    )
    current = VariantVersion.with_ciphertext.get(pk=payload["version"]["id"])
    assert current.upstream == previous.upstream
    assert crypto.decrypt_api_key(current.encrypted_api_key) == canary_key


def test_rotate_key_text_names_the_new_version(partner_key_env):
    variant = first_variant(make_experiment())
    out, _ = run("rotate-key", str(variant.pk), "--api-key-env", partner_key_env)
    current = VariantVersion.objects.filter(variant=variant).effective_at().first()
    assert str(current.pk) in out and "Rotated" in out


def test_rotate_key_without_env_and_without_tty_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    variant = first_variant(make_experiment())
    before = db_state()
    assert "--api-key-env" in refusal("rotate-key", str(variant.pk))
    assert db_state() == before


# --- the status matrix --------------------------------------------------------------------

STATUSES = ["draft", "active", "paused", "completed"]
ACTIONS = ["activate", "pause", "complete", "archive", "unarchive"]
#: (status, action) -> expected (status, is_archived) afterwards; "noop" or "refused" otherwise.
OUTCOMES = {
    ("draft", "activate"): ("active", False),
    ("active", "activate"): "noop",
    ("paused", "activate"): ("active", False),
    ("completed", "activate"): "refused",
    ("draft", "pause"): "refused",
    ("active", "pause"): ("paused", False),
    ("paused", "pause"): "noop",
    ("completed", "pause"): "refused",
    ("draft", "complete"): "refused",
    ("active", "complete"): ("completed", False),
    ("paused", "complete"): ("completed", False),
    ("completed", "complete"): "noop",
    ("draft", "archive"): ("draft", True),
    ("active", "archive"): "refused",
    ("paused", "archive"): ("paused", True),
    ("completed", "archive"): ("completed", True),
    # unarchive starts from an archived experiment (an active one cannot be archived).
    ("draft", "unarchive"): ("draft", False),
    ("active", "unarchive"): "noop",
    ("paused", "unarchive"): ("paused", False),
    ("completed", "unarchive"): ("completed", False),
}


def matrix_experiment(status: str, action: str) -> Experiment:
    archived = action == "unarchive" and status != "active"
    return make_experiment(status=status, is_archived=archived)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("status", STATUSES)
def test_status_matrix_through_the_command(status, action):
    experiment = matrix_experiment(status, action)
    expected = OUTCOMES[(status, action)]
    before = db_state()
    if expected == "refused":
        out = io.StringIO()
        with pytest.raises(CommandError) as excinfo:
            call_command("experiment", action, str(experiment.pk), "--json", stdout=out)
        assert excinfo.value.returncode == 1
        assert f"experiment is {status}" in str(excinfo.value)
        assert json.loads(out.getvalue()) == {"ok": False, "error": str(excinfo.value)}
        assert db_state() == before
        return
    payload = run_json(action, str(experiment.pk))
    experiment.refresh_from_db()
    if expected == "noop":
        assert payload["changed"] is False
        assert db_state() == before
    else:
        assert payload["changed"] is True
        assert (experiment.status, experiment.is_archived) == expected


@pytest.mark.parametrize(
    ("status", "action"),
    [key for key, outcome in OUTCOMES.items() if isinstance(outcome, tuple)],
)
def test_repeating_an_allowed_transition_is_a_noop(status, action):
    experiment = matrix_experiment(status, action)
    run(action, str(experiment.pk))
    after_first = db_state()
    out, _ = run(action, str(experiment.pk))
    assert "nothing to do" in out
    assert db_state() == after_first


def test_transition_text_reports_the_new_status():
    experiment = make_experiment()
    out, _ = run("activate", str(experiment.pk))
    assert "now active" in out


def test_activation_problems_are_reported_in_one_line():
    experiment = ExperimentFactory()
    VariantFactory(experiment=experiment)
    before = db_state()
    assert "at least two slots" in refusal("activate", str(experiment.pk))
    assert db_state() == before


# --- bad inputs change nothing ------------------------------------------------------------

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def _bad_input_cases():
    long_label = "x" * 65
    return [
        (
            "malformed experiment id",
            lambda e, v: ["show", "not-a-uuid"],
            "No experiment matches 'not-a-uuid'.",
        ),
        ("malformed variant id", lambda e, v: ["weight", "xyz", "2"], "No variant matches 'xyz'."),
        ("unknown experiment", lambda e, v: ["activate", UNKNOWN], "No experiment matches"),
        ("unknown variant", lambda e, v: ["label", UNKNOWN, "x"], "No variant matches"),
        ("weight 0", lambda e, v: ["weight", str(v.pk), "0"], "positive whole number"),
        ("weight -1", lambda e, v: ["weight", str(v.pk), "-1"], "positive whole number"),
        ("weight abc", lambda e, v: ["weight", str(v.pk), "abc"], "positive whole number"),
        (
            "add-variant weight 0",
            lambda e, v: ["add-variant", str(e.pk), "--label", "n", "--weight", "0"],
            "positive whole number",
        ),
        (
            "add-variant weight abc",
            lambda e, v: ["add-variant", str(e.pk), "--label", "n", "--weight", "abc"],
            "positive whole number",
        ),
        ("label too long", lambda e, v: ["label", str(v.pk), long_label], "at most 64"),
        (
            "add-variant label too long",
            lambda e, v: ["add-variant", str(e.pk), "--label", long_label, "--weight", "1"],
            "at most 64",
        ),
        (
            "duplicate label",
            lambda e, v: ["add-variant", str(e.pk), "--label", v.label, "--weight", "1"],
            "already exists",
        ),
        ("empty name", lambda e, v: ["update", str(e.pk), "--name", "  "], "Name is required."),
    ]


@pytest.mark.parametrize(
    ("args_for", "expected"),
    [case[1:] for case in _bad_input_cases()],
    ids=[case[0] for case in _bad_input_cases()],
)
def test_bad_input_is_refused_and_changes_nothing(args_for, expected):
    experiment = make_experiment()
    before = db_state()
    assert expected in refusal(*args_for(experiment, first_variant(experiment)))
    assert db_state() == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        ({**upstream_config(), "api_key": "sk-x"}, "'api_key' is not an allowed field"),
        ({**upstream_config(), "extra_headers": {"a": "b"}}, "'extra_headers' is not an allowed"),
        (upstream_config(base_url="ftp://partner.example/v1"), "Base URL must be an http(s) URL"),
        ({"base_url": "https://partner.example/v1"}, "Internal model id is required."),
    ],
    ids=["not-json", "not-object", "api_key", "extra_headers", "non-http", "no-internal-id"],
)
def test_invalid_upstream_file_is_refused_and_writes_no_version(
    tmp_path, partner_key_env, content, expected
):
    variant = first_variant(make_experiment())
    before = db_state()
    message = refusal(
        "swap",
        str(variant.pk),
        "--upstream-file",
        upstream_file(tmp_path, content),
        "--api-key-env",
        partner_key_env,
    )
    assert expected in message
    assert db_state() == before


def test_unreadable_upstream_file_is_refused(tmp_path, partner_key_env):
    variant = first_variant(make_experiment())
    before = db_state()
    message = refusal(
        "swap",
        str(variant.pk),
        "--upstream-file",
        str(tmp_path / "missing.json"),
        "--api-key-env",
        partner_key_env,
    )
    assert "Cannot read upstream file" in message
    assert db_state() == before


def test_invalid_json_error_does_not_echo_the_file(tmp_path, partner_key_env, canary_key):
    variant = first_variant(make_experiment())
    message = refusal(
        "swap",
        str(variant.pk),
        "--upstream-file",
        upstream_file(tmp_path, f"{{{canary_key}"),
        "--api-key-env",
        partner_key_env,
    )
    assert canary_key not in message


@pytest.mark.parametrize("command", ["swap", "rotate-key"])
def test_missing_key_env_var_is_refused(tmp_path, monkeypatch, command):
    monkeypatch.delenv("MX_UNSET_VARIABLE", raising=False)
    variant = first_variant(make_experiment())
    extra = (
        ["--upstream-file", upstream_file(tmp_path, upstream_config())] if command == "swap" else []
    )
    before = db_state()
    message = refusal(command, str(variant.pk), *extra, "--api-key-env", "MX_UNSET_VARIABLE")
    assert "not set" in message
    assert db_state() == before


def test_key_passed_in_place_of_the_env_var_name_is_refused_without_echo(canary_key):
    variant = first_variant(make_experiment())
    before = db_state()
    message = refusal("rotate-key", str(variant.pk), "--api-key-env", canary_key)
    assert "NAME of an environment variable" in message
    assert canary_key not in message
    assert db_state() == before


def test_swap_without_key_into_an_empty_slot_is_refused(tmp_path):
    experiment = ExperimentFactory()
    variant = VariantFactory(experiment=experiment)
    before = db_state()
    message = refusal(
        "swap", str(variant.pk), "--upstream-file", upstream_file(tmp_path, upstream_config())
    )
    assert "API key is required" in message
    assert db_state() == before


@pytest.mark.parametrize(
    "encryption_key",
    ["", "not base64!!", base64.b64encode(b"16-bytes-only!!!").decode()],
    ids=["missing", "not-base64", "wrong-length"],
)
@pytest.mark.parametrize("command", ["swap", "rotate-key"])
def test_unusable_encryption_key_refuses_and_writes_no_version(
    tmp_path, partner_key_env, command, encryption_key
):
    variant = first_variant(make_experiment())
    extra = (
        ["--upstream-file", upstream_file(tmp_path, upstream_config())] if command == "swap" else []
    )
    before = db_state()
    with override_settings(BYOK_ENCRYPTION_KEY=encryption_key):
        message = refusal(command, str(variant.pk), *extra, "--api-key-env", partner_key_env)
    assert "BYOK_ENCRYPTION_KEY" in message
    assert db_state() == before


def test_json_error_is_one_object_on_stdout():
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("experiment", "show", "nope", "--json", stdout=out)
    assert out.getvalue().count("\n") == 1
    assert json.loads(out.getvalue())["ok"] is False


def test_json_and_by_are_accepted_before_the_subcommand():
    user = UserFactory(username="alice")
    experiment = make_experiment()
    out, _ = run("--json", "--by", "alice", "activate", str(experiment.pk))
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert json.loads(out)["changed"] is True
    assert entry.user == user


# --- history ------------------------------------------------------------------------------


def test_transition_with_by_records_that_user_in_the_history():
    user = UserFactory(username="operator-ann")
    experiment = make_experiment()
    run("activate", str(experiment.pk), "--by", "operator-ann")
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.user == user
    assert "active" in entry.change_message


def test_transition_without_by_records_the_service_user():
    experiment = make_experiment()
    run("activate", str(experiment.pk))
    entry = LogEntry.objects.filter(object_id=str(experiment.pk)).latest("action_time")
    assert entry.user.username == "manage.py"


def test_unknown_by_user_is_refused_and_changes_nothing():
    experiment = make_experiment()
    before = db_state()
    assert refusal("activate", str(experiment.pk), "--by", "ghost") == (
        "No user matches 'ghost' (--by)."
    )
    assert db_state() == before


# --- the canary key -----------------------------------------------------------------------


def _canary_session(tmp_path, key_env: str) -> list[str]:
    """Drive every subcommand with the canary key; return everything they printed."""
    outputs: list[str] = []

    def capture(*args: str) -> None:
        out, err = io.StringIO(), io.StringIO()
        try:
            call_command("experiment", *args, stdout=out, stderr=err)
        except CommandError as exc:
            outputs.append(str(exc))
        outputs.extend([out.getvalue(), err.getvalue()])

    experiment_id = json.loads(
        call_command_output("create", "--public-model-id", "kilo/canary", "--name", "Canary")
    )["id"]
    variant_ids = [
        json.loads(
            call_command_output("add-variant", experiment_id, "--label", label, "--weight", "1")
        )["id"]
        for label in ("a", "b")
    ]
    path = upstream_file(tmp_path, upstream_config(base_url="https://partner.example/v1"))
    for variant_id in variant_ids:
        capture("swap", variant_id, "--upstream-file", path, "--api-key-env", key_env)
        capture("swap", variant_id, "--upstream-file", path, "--api-key-env", key_env, "--json")
    capture("rotate-key", variant_ids[0], "--api-key-env", key_env)
    capture("rotate-key", variant_ids[1], "--api-key-env", key_env, "--json")
    capture("activate", experiment_id)
    for args in (["show", experiment_id], ["list", "--all"]):
        capture(*args)
        capture(*args, "--json")
    capture("complete", experiment_id, "--json")
    # Refused after completion: the error path must not leak either.
    capture("rotate-key", variant_ids[0], "--api-key-env", key_env)
    capture("swap", variant_ids[0], "--upstream-file", path, "--api-key-env", key_env, "--json")
    sync_out = io.StringIO()
    call_command("sync_experiment_cache", stdout=sync_out)
    outputs.append(sync_out.getvalue())
    return outputs


def call_command_output(*args: str) -> str:
    return run(*args, "--json")[0]


def test_canary_key_and_ciphertext_never_reach_command_output_or_logs(
    tmp_path, partner_key_env, canary_key, caplog, django_capture_on_commit_callbacks
):
    caplog.set_level(logging.DEBUG)
    # Log every SQL statement with its parameters: the plaintext must not be among them.
    connection.force_debug_cursor = True
    try:
        with django_capture_on_commit_callbacks(execute=True):
            outputs = _canary_session(tmp_path, partner_key_env)
    finally:
        connection.force_debug_cursor = False
    everything = "\n".join(outputs)
    assert "Rotated" in everything and "kilo/canary" in everything  # the session really ran
    assert canary_key not in everything
    assert all(canary_key not in record.getMessage() for record in caplog.records)
    assert canary_key not in caplog.text
    envelopes = VariantVersion.with_ciphertext.values_list("encrypted_api_key", flat=True)
    ciphertext_parts = {part for envelope in envelopes for part in envelope.values()}
    assert len(ciphertext_parts) >= 3 * 2  # several distinct envelopes were written
    assert not [part for part in ciphertext_parts if part in everything]


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs Redis (REDIS_URL)")
def test_canary_key_is_in_no_redis_value(
    tmp_path, partner_key_env, canary_key, django_capture_on_commit_callbacks
):
    from django_redis import get_redis_connection

    with django_capture_on_commit_callbacks(execute=True):
        _canary_session(tmp_path, partner_key_env)
    # A routing experiment holding the canary's ciphertext, so a payload sits in Redis too.
    experiment = make_experiment(status=ExperimentStatus.PAUSED, api_key=canary_key)
    call_command("sync_experiment_cache", stdout=io.StringIO())
    redis = get_redis_connection("default")
    stored = {key: _redis_value(redis, key) for key in redis.scan_iter("*")}
    assert any(experiment.public_model_id.encode() in key for key in stored)
    assert all(canary_key.encode() not in key + value for key, value in stored.items())


def _redis_value(redis, key: bytes) -> bytes:
    kind = redis.type(key)
    if kind == b"string":
        return redis.get(key) or b""
    if kind == b"hash":
        return b" ".join(k + b"=" + v for k, v in redis.hgetall(key).items())
    if kind in (b"set", b"zset", b"list"):
        members = {
            b"set": lambda: redis.smembers(key),
            b"zset": lambda: redis.zrange(key, 0, -1),
            b"list": lambda: redis.lrange(key, 0, -1),
        }[kind]()
        return b" ".join(members)
    return repr(redis.dump(key)).encode()


# --- generate_encryption_key -------------------------------------------------------------


def test_generate_encryption_key_prints_only_a_base64_32_byte_key():
    out, _ = run(command="generate_encryption_key")
    assert out.endswith("\n") and out.count("\n") == 1
    assert len(base64.b64decode(out.strip(), validate=True)) == 32


def test_generate_encryption_key_is_fresh_each_time():
    first, _ = run(command="generate_encryption_key")
    second, _ = run(command="generate_encryption_key")
    assert first != second


def test_generated_key_is_usable_for_encryption():
    key, _ = run(command="generate_encryption_key")
    envelope = crypto.encrypt_api_key("sk-x", key_b64=key.strip())
    assert crypto.decrypt_api_key(envelope, key_b64=key.strip()) == "sk-x"


# --- sync_experiment_cache ----------------------------------------------------------------


requires_redis = pytest.mark.skipif(
    not settings.REDIS_URL, reason="needs a shared cache (REDIS_URL) to rebuild"
)


@requires_redis
def test_sync_rebuilds_membership_and_payloads_after_a_flush():
    from django.core.cache import cache

    active = make_experiment(status=ExperimentStatus.ACTIVE)
    paused = make_experiment(status=ExperimentStatus.PAUSED)
    make_experiment(status=ExperimentStatus.DRAFT)
    # A completed experiment on the active one's id must not displace it.
    make_experiment(status=ExperimentStatus.COMPLETED, public_model_id=active.public_model_id)
    make_experiment(status=ExperimentStatus.COMPLETED)
    cache.clear()
    out, _ = run(command="sync_experiment_cache")
    membership = json.loads(routing_cache.read_membership_raw())
    assert membership["ids"] == sorted([active.public_model_id, paused.public_model_id])
    payload = json.loads(cache.get(routing_cache.payload_key(active.public_model_id)))
    assert payload["experiment_id"] == str(active.pk)
    assert payload["token"] == membership["token"] == routing_cache.read_generation().token
    assert "2 public id(s)" in out and str(membership["generation"]) in out


@requires_redis
def test_sync_json_reports_count_and_generation():
    make_experiment(status=ExperimentStatus.ACTIVE)
    out, _ = run("--json", command="sync_experiment_cache")
    payload = json.loads(out)
    assert (payload["public_ids"], payload["shared_cache"]) == (1, True)
    assert payload["generation"] == json.loads(routing_cache.read_membership_raw())["generation"]


def test_sync_without_redis_says_there_is_no_shared_cache_and_moves_the_generation(settings):
    settings.REDIS_URL = ""
    before = routing_cache.read_generation()
    out, _ = run(command="sync_experiment_cache")
    after = routing_cache.read_generation()
    assert after.number == before.number + 1
    assert out.startswith("No shared routing cache to rebuild: REDIS_URL is unset")
    assert f"Routing generation moved to {after.number}" in out
    assert "every gateway process reloads routing from the database within 1 s" in out
    json_out, _ = run("--json", command="sync_experiment_cache")
    assert json.loads(json_out) == {
        "ok": True,
        "shared_cache": False,
        "generation": after.number + 1,
    }


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sync_with_unreachable_redis_exits_non_zero_with_a_clear_message():
    make_experiment(status=ExperimentStatus.ACTIVE)
    unreachable = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{_closed_port()}/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        }
    }
    with (
        override_settings(CACHES=unreachable, REDIS_URL=unreachable["default"]["LOCATION"]),
        pytest.raises(CommandError) as excinfo,
    ):
        run(command="sync_experiment_cache")
    assert excinfo.value.returncode == 1
    assert "Cannot reach the cache (Redis)" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


# --- real processes -----------------------------------------------------------------------


def _subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a `manage.py` child that sees this test's database."""
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        auth = quote(db["USER"] or "", safe="")
        if db["PASSWORD"]:
            auth += ":" + quote(db["PASSWORD"], safe="")
        url = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    elif connection.vendor == "sqlite" and not connection.is_in_memory_db():
        url = f"sqlite:///{Path(db['NAME']).resolve()}"
    else:
        pytest.skip("the test database is in memory; a child process cannot see it")
    return {
        **os.environ,
        "DATABASE_URL": url,
        "BYOK_ENCRYPTION_KEY": settings.BYOK_ENCRYPTION_KEY,
        **extra,
    }


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.django_db(transaction=True)
def test_process_rotate_key_takes_the_key_from_the_environment_only(canary_key):
    variant = first_variant(make_experiment())
    argv = ["experiment", "rotate-key", str(variant.pk), "--api-key-env", KEY_ENV]
    result = manage(*argv, env=_subprocess_env(**{KEY_ENV: canary_key}))
    assert result.returncode == 0, result.stderr
    assert canary_key not in " ".join(argv)
    assert canary_key not in result.stdout + result.stderr
    current = VariantVersion.with_ciphertext.filter(variant=variant).effective_at().first()
    assert crypto.decrypt_api_key(current.encrypted_api_key) == canary_key


@pytest.mark.django_db(transaction=True)
def test_process_rejects_a_key_given_as_an_argument_without_echoing_it(canary_key):
    variant = first_variant(make_experiment())
    before = db_state()
    result = manage(
        "experiment", "rotate-key", str(variant.pk), "--api-key", canary_key, env=_subprocess_env()
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --api-key" in result.stderr
    assert canary_key not in result.stdout + result.stderr
    assert db_state() == before


@pytest.mark.django_db(transaction=True)
def test_process_sync_with_unreachable_database_exits_1_with_one_line_reason():
    env = _subprocess_env()
    env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{_closed_port()}/nowhere"
    result = manage("sync_experiment_cache", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "CommandError: Cannot reach the database (OperationalError); nothing was changed. "
        "Check DATABASE_URL and that the database is running."
    ]


@pytest.mark.django_db(transaction=True)
def test_process_refused_transition_exits_1_with_one_line_reason():
    experiment = make_experiment()
    result = manage("experiment", "pause", str(experiment.pk), "--json", env=_subprocess_env())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "CommandError: Cannot pause: experiment is draft; only active experiments can be paused."
    ]
    assert json.loads(result.stdout)["ok"] is False
    assert Experiment.objects.get(pk=experiment.pk).status == ExperimentStatus.DRAFT


def test_process_generate_encryption_key_prints_only_the_key():
    env = {k: v for k, v in os.environ.items() if k != "BYOK_ENCRYPTION_KEY"}
    result = manage("generate_encryption_key", env=env)
    assert result.returncode == 0, result.stderr
    assert len(base64.b64decode(result.stdout.strip(), validate=True)) == 32
    assert result.stdout.count("\n") == 1
