"""One encryption key for every process, and a fingerprint that names a mismatch (issue 7, item 11).

A command run in a second shell used to say "generate one with generate_encryption_key";
doing so encrypted checkpoints under a key the running gateway lacked, and every request
became an unexplained 503. Now every process reads the key from the same place, each
checkpoint records a non-secret fingerprint of the key that encrypted it, and a mismatch
is refused at activation, shown in the admin and `experiment show`, and logged once by
the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from pathlib import Path

import httpx
import pytest
from django.urls import reverse

from config import settings as settings_module
from experiments import crypto, services
from experiments.models import Experiment, ExperimentStatus, VariantVersion
from gateway.errors import GatewayError
from gateway.routing import Router
from gateway.subjects import Subject
from tests.factories import SuperUserFactory, make_experiment, upstream_config
from tests.gateway_server import requires_server, server_env
from tests.gateway_support import wait_listed
from tests.test_commands import KEY_ENV, db_state, manage, refusal, run
from tests.upstream import PARTNER_API_KEY

pytestmark = pytest.mark.django_db

OTHER_KEY = crypto.generate_key()


def fingerprint(key_b64: str) -> str:
    return crypto.key_fingerprint(key_b64)


def encrypted_under(key_b64: str, settings, **fields) -> Experiment:
    """A draft whose checkpoints were encrypted by a process running with ``key_b64``."""
    running_key = settings.BYOK_ENCRYPTION_KEY
    settings.BYOK_ENCRYPTION_KEY = key_b64
    experiment = make_experiment(**fields)
    for variant in experiment.variants.order_by("id"):
        services.hot_swap(variant=variant, upstream=upstream_config(), api_key="sk-partner")
    settings.BYOK_ENCRYPTION_KEY = running_key
    return experiment


# --- where the key is read from ---------------------------------------------------------


@pytest.fixture
def key_env(monkeypatch):
    """The process environment as settings read it, starting with no key configured."""
    monkeypatch.delenv("BYOK_ENCRYPTION_KEY", raising=False)
    monkeypatch.delenv("BYOK_ENCRYPTION_KEY_FILE", raising=False)
    return monkeypatch


def read_key_settings() -> tuple[str, str, str, str]:
    key_file, source = settings_module.encryption_key_source()
    key, problem = settings_module.read_encryption_key(key_file, source)
    return key_file, source, key, problem


def test_key_file_named_by_the_environment_is_read(key_env, tmp_path):
    key = crypto.generate_key()
    (tmp_path / "encryption.key").write_text(key + "\n")
    key_env.setenv("BYOK_ENCRYPTION_KEY_FILE", str(tmp_path / "encryption.key"))
    assert read_key_settings()[2:] == (key, "")


def test_relative_key_file_is_read_relative_to_the_project_whatever_the_working_directory(
    key_env, tmp_path
):
    key_env.chdir(tmp_path)
    key_env.setenv("BYOK_ENCRYPTION_KEY_FILE", "var/encryption.key")
    key_file, *_ = read_key_settings()
    assert Path(key_file) == settings_module.BASE_DIR / "var" / "encryption.key"


def test_demo_key_file_is_read_when_nothing_is_configured(key_env, tmp_path):
    # var/encryption.key, where `bash .ci/demo` keeps the key, stands in at tmp_path.
    key = crypto.generate_key()
    (tmp_path / "encryption.key").write_text(key)
    key_env.setattr(settings_module, "DEFAULT_ENCRYPTION_KEY_FILE", tmp_path / "encryption.key")
    key_file, source, read, problem = read_key_settings()
    assert (read, problem) == (key, "")
    assert str(tmp_path / "encryption.key") in source


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        (b"", "does not hold a base64 key"),
        (b"\xff\xfe sk-canary-in-a-binary-file", "does not hold a base64 key"),
    ],
    ids=["missing", "empty", "binary"],
)
def test_unusable_key_file_is_named_with_the_reason_and_never_its_content(
    key_env, tmp_path, content, reason
):
    path = tmp_path / "encryption.key"
    if content is not None:
        path.write_bytes(content)
    key_env.setenv("BYOK_ENCRYPTION_KEY_FILE", str(path))
    *_, key, problem = read_key_settings()
    assert key == ""
    assert str(path) in problem and reason in problem
    assert "sk-canary" not in problem


def test_key_in_both_the_variable_and_a_file_is_refused(key_env, tmp_path):
    (tmp_path / "encryption.key").write_text(crypto.generate_key())
    key_env.setenv("BYOK_ENCRYPTION_KEY", crypto.generate_key())
    key_env.setenv("BYOK_ENCRYPTION_KEY_FILE", str(tmp_path / "encryption.key"))
    *_, key, problem = read_key_settings()
    assert key == "" and "set only one" in problem


def test_command_without_a_key_says_where_the_key_is_read_and_that_a_new_key_cannot_decrypt(
    settings, monkeypatch
):
    variant = make_experiment().variants.first()
    before = db_state()
    settings.BYOK_ENCRYPTION_KEY = ""
    monkeypatch.setenv(KEY_ENV, "sk-new-partner-key")
    message = refusal("rotate-key", str(variant.pk), "--api-key-env", KEY_ENV)
    assert "BYOK_ENCRYPTION_KEY_FILE" in message
    assert "cannot decrypt the partner keys already stored" in message
    assert db_state() == before


@requires_server
def test_command_with_an_unreadable_key_file_names_it_and_changes_nothing(
    transactional_db, tmp_path, canary_key
):
    variant = make_experiment().variants.first()
    before = db_state()
    garbage = tmp_path / "encryption.key"
    garbage.write_text(canary_key)  # not a base64 key: must never be echoed
    for key_file in (tmp_path / "missing.key", garbage):
        env = server_env(
            tmp_path,
            BYOK_ENCRYPTION_KEY="",
            BYOK_ENCRYPTION_KEY_FILE=str(key_file),
            **{KEY_ENV: "sk-new-partner-key"},
        )
        result = manage(
            "experiment", "rotate-key", str(variant.pk), "--api-key-env", KEY_ENV, env=env
        )
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1
        assert str(key_file) in result.stderr
        assert canary_key not in result.stdout + result.stderr
    assert db_state() == before


@requires_server
def test_commands_and_the_gateway_read_the_key_from_the_same_file(
    gateway_factory, keyed_upstream, transactional_db, tmp_path
):
    key_file = tmp_path / "encryption.key"
    key_file.write_text(crypto.generate_key() + "\n")
    keyed = {"BYOK_ENCRYPTION_KEY": "", "BYOK_ENCRYPTION_KEY_FILE": str(key_file)}
    env = server_env(tmp_path, **keyed, **{KEY_ENV: PARTNER_API_KEY})
    experiment = services.create_experiment(public_model_id="kilo/preview-keyfile", name="Keys")
    upstream_file = tmp_path / "upstream.json"
    for label in ("rc1", "rc2"):
        variant = services.add_variant(experiment=experiment, label=label, weight=1)
        upstream_file.write_text(json.dumps(upstream_config(base_url=keyed_upstream.base_url)))
        swap = ["experiment", "swap", str(variant.pk), "--upstream-file", str(upstream_file)]
        result = manage(*swap, "--api-key-env", KEY_ENV, env=env)
        assert result.returncode == 0, result.stderr
    result = manage("experiment", "activate", str(experiment.pk), env=env)
    assert result.returncode == 0, result.stderr

    gateway = gateway_factory(**keyed)
    wait_listed(gateway, experiment.public_model_id)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": experiment.public_model_id, "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-KiloCode-MachineId": "machine-1"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert keyed_upstream.received[-1]["headers"]["authorization"] == f"Bearer {PARTNER_API_KEY}"


# --- the fingerprint ----------------------------------------------------------------------


def test_fingerprint_names_a_key_without_revealing_it():
    key = crypto.generate_key()
    raw = base64.b64decode(key)
    expected = hmac.new(raw, crypto.FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]
    assert fingerprint(key) == expected
    assert fingerprint(key) not in hashlib.sha256(raw).hexdigest()
    assert fingerprint(key) not in raw.hex() and fingerprint(key) not in key
    assert fingerprint(key) != fingerprint(crypto.generate_key())


def test_hot_swap_with_a_new_key_records_the_fingerprint_of_the_key_in_use(settings):
    variant = make_experiment().variants.first()
    version = services.hot_swap(variant=variant, upstream=upstream_config(), api_key="sk-new")
    assert version.key_fingerprint == fingerprint(settings.BYOK_ENCRYPTION_KEY)


def test_key_rotation_records_the_fingerprint_of_the_key_in_use(settings):
    variant = make_experiment().variants.first()
    version = services.rotate_key(variant=variant, api_key="sk-rotated")
    assert version.key_fingerprint == fingerprint(settings.BYOK_ENCRYPTION_KEY)


def test_hot_swap_keeping_the_key_keeps_the_fingerprint_of_the_key_that_encrypted_it(settings):
    variant = encrypted_under(OTHER_KEY, settings).variants.first()
    version = services.hot_swap(variant=variant, upstream=upstream_config(internal_id="rc-next"))
    assert version.key_fingerprint == fingerprint(OTHER_KEY)


def test_hot_swap_keeping_a_key_of_unknown_fingerprint_records_the_key_that_opens_it(settings):
    variant = make_experiment().variants.first()
    VariantVersion.objects.filter(variant=variant).update(key_fingerprint="")  # a pre-0004 row
    version = services.hot_swap(variant=variant, upstream=upstream_config(internal_id="rc-next"))
    assert version.key_fingerprint == fingerprint(settings.BYOK_ENCRYPTION_KEY)


# --- activation -------------------------------------------------------------------------------


def test_activation_is_refused_naming_the_slot_and_both_keys_when_a_checkpoint_used_another_key(
    settings,
):
    experiment = encrypted_under(OTHER_KEY, settings)
    first_label = experiment.variants.order_by("id").first().label
    with pytest.raises(services.TransitionRefused) as refused:
        services.activate(experiment=experiment)
    message = refused.value.message
    assert f"slot {first_label!r}" in message
    assert fingerprint(OTHER_KEY) in message
    assert fingerprint(settings.BYOK_ENCRYPTION_KEY) in message
    assert Experiment.objects.get(pk=experiment.pk).status == ExperimentStatus.DRAFT


def test_command_activation_under_another_key_is_refused_in_one_line(settings):
    experiment = encrypted_under(OTHER_KEY, settings)
    before = db_state()
    message = refusal("activate", str(experiment.pk))
    assert fingerprint(OTHER_KEY) in message
    assert fingerprint(settings.BYOK_ENCRYPTION_KEY) in message
    assert db_state() == before


def _forget_fingerprints(experiment: Experiment) -> None:
    """Rows as written before fingerprints were recorded."""
    VariantVersion.objects.filter(variant__experiment=experiment).update(key_fingerprint="")


def test_activation_is_refused_when_a_checkpoint_of_unknown_key_does_not_decrypt(settings):
    experiment = encrypted_under(OTHER_KEY, settings)
    _forget_fingerprints(experiment)
    with pytest.raises(services.TransitionRefused, match="cannot decrypt"):
        services.activate(experiment=experiment)


def test_activation_accepts_a_checkpoint_of_unknown_key_that_decrypts():
    experiment = make_experiment()
    _forget_fingerprints(experiment)
    assert services.activate(experiment=experiment).status == ExperimentStatus.ACTIVE


# --- warnings -------------------------------------------------------------------------------


def test_change_page_warns_when_a_checkpoint_was_encrypted_under_another_key(client, settings):
    experiment = encrypted_under(OTHER_KEY, settings)
    client.force_login(SuperUserFactory())
    page = client.get(reverse("admin:experiments_experiment_change", args=[experiment.pk]))
    warnings = page.context["key_warnings"]
    assert len(warnings) == 2
    assert fingerprint(OTHER_KEY) in warnings[0]
    assert fingerprint(settings.BYOK_ENCRYPTION_KEY) in warnings[0]
    assert 'class="errornote mx-key-warning"' in page.content.decode()


def test_change_page_has_no_key_warning_when_every_checkpoint_uses_the_key_in_use(client):
    experiment = make_experiment()
    client.force_login(SuperUserFactory())
    page = client.get(reverse("admin:experiments_experiment_change", args=[experiment.pk]))
    assert page.context["key_warnings"] == []
    assert "mx-key-warning" not in page.content.decode()


def test_experiment_show_warns_when_a_checkpoint_was_encrypted_under_another_key(settings):
    experiment = encrypted_under(OTHER_KEY, settings)
    text, _ = run("show", str(experiment.pk))
    warnings = [line for line in text.splitlines() if line.startswith("WARNING: ")]
    assert len(warnings) == 2 and fingerprint(OTHER_KEY) in warnings[0]
    shown = json.loads(run("show", str(experiment.pk), "--json")[0])["experiment"]
    assert len(shown["key_warnings"]) == 2
    checkpoint = shown["variants"][0]["current_checkpoint"]
    assert checkpoint["key_fingerprint"] == fingerprint(OTHER_KEY)


# --- the gateway ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_gateway_logs_a_checkpoint_it_cannot_decrypt_once_by_fingerprint(settings, caplog):
    experiment = make_experiment()
    services.activate(experiment=experiment)
    rows_key = settings.BYOK_ENCRYPTION_KEY
    settings.BYOK_ENCRYPTION_KEY = OTHER_KEY  # the gateway runs with another key
    router = Router()
    caplog.set_level(logging.ERROR, logger="gateway.routing")
    for machine in ("m-1", "m-2", "m-3", "m-4"):
        with pytest.raises(GatewayError) as refused:
            asyncio.run(
                router.resolve(experiment.public_model_id, lambda m=machine: Subject("machine", m))
            )
        assert (refused.value.status, refused.value.error_kind) == (503, "key_undecryptable")
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.routing"]
    assert len(lines) == 1, lines
    assert fingerprint(rows_key) in lines[0] and fingerprint(OTHER_KEY) in lines[0]
