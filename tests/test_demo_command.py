"""``manage.py demo --no-serve``: the demo admin and experiment, seeded idempotently."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from experiments import crypto
from experiments.models import Experiment, ExperimentStatus, VariantVersion
from gateway.models import GatewayToken
from gateway.tokens import hash_token, revoke_token

pytestmark = pytest.mark.django_db

UPSTREAM_PORT = 18001


@pytest.fixture(autouse=True)
def _static_root_in_tmp(settings, tmp_path):
    # collectstatic must not write into the working tree during tests.
    settings.STATIC_ROOT = tmp_path / "static"


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "var"


def run_demo(state_dir, upstream_port: int = UPSTREAM_PORT) -> str:
    out = io.StringIO()
    call_command(
        "demo", no_serve=True, upstream_port=upstream_port, state_dir=str(state_dir), stdout=out
    )
    return out.getvalue()


def demo_experiment() -> Experiment:
    return Experiment.objects.get(public_model_id="kilo/preview-demo")


def current_versions() -> dict[str, VariantVersion]:
    return {
        variant.label: VariantVersion.with_ciphertext.filter(variant=variant)
        .order_by("-effective_at")
        .first()
        for variant in demo_experiment().variants.all()
    }


def test_demo_creates_an_active_experiment_with_rc1_and_rc2_at_equal_weights(state_dir):
    run_demo(state_dir)
    experiment = demo_experiment()
    assert experiment.status == ExperimentStatus.ACTIVE
    assert sorted((v.label, v.weight) for v in experiment.variants.all()) == [
        ("rc1", 1),
        ("rc2", 1),
    ]


def test_demo_checkpoints_point_at_the_demo_upstream(state_dir):
    run_demo(state_dir)
    versions = current_versions()
    assert versions["rc1"].upstream["internal_id"] == "demo-model-rc1"
    assert versions["rc2"].upstream["internal_id"] == "demo-model-rc2"
    assert {v.upstream["base_url"] for v in versions.values()} == {
        f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
    }


def test_demo_checkpoints_carry_the_stored_partner_key(state_dir):
    run_demo(state_dir)
    partner_key = (state_dir / "demo-partner-key").read_text().strip()
    for version in current_versions().values():
        assert crypto.decrypt_api_key(version.encrypted_api_key) == partner_key


def test_demo_creates_a_superuser_whose_password_is_stored_and_printed(state_dir):
    output = run_demo(state_dir)
    password = (state_dir / "demo-admin-password").read_text().strip()
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff
    assert admin.check_password(password)
    assert f"password: {password}" in output


def test_demo_admin_password_from_environment_is_used_and_not_stored(state_dir, monkeypatch):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "chosen-demo-pass-42")
    run_demo(state_dir)
    assert get_user_model().objects.get(username="admin").check_password("chosen-demo-pass-42")
    assert not (state_dir / "demo-admin-password").exists()


def test_demo_run_twice_changes_nothing(state_dir):
    run_demo(state_dir)
    password = (state_dir / "demo-admin-password").read_text()
    versions_before = set(VariantVersion.objects.values_list("pk", flat=True))
    output = run_demo(state_dir)
    assert Experiment.objects.count() == 1
    assert set(VariantVersion.objects.values_list("pk", flat=True)) == versions_before
    assert get_user_model().objects.filter(username="admin").count() == 1
    assert (state_dir / "demo-admin-password").read_text() == password
    assert "already in place" in output


def test_demo_with_another_upstream_port_hot_swaps_the_same_slots(state_dir):
    run_demo(state_dir)
    variant_ids = set(demo_experiment().variants.values_list("pk", flat=True))
    run_demo(state_dir, upstream_port=18002)
    assert set(demo_experiment().variants.values_list("pk", flat=True)) == variant_ids
    assert {v.upstream["base_url"] for v in current_versions().values()} == {
        "http://127.0.0.1:18002/v1"
    }
    assert VariantVersion.objects.count() == 4


def test_demo_reloads_the_key_when_the_stored_partner_key_changes(state_dir):
    run_demo(state_dir)
    (state_dir / "demo-partner-key").write_text("sk-demo-replaced-key\n")
    run_demo(state_dir)
    for version in current_versions().values():
        assert crypto.decrypt_api_key(version.encrypted_api_key) == "sk-demo-replaced-key"


def test_demo_output_never_shows_the_partner_key_or_its_ciphertext(state_dir, canary_key):
    state_dir.mkdir(parents=True)
    (state_dir / "demo-partner-key").write_text(canary_key + "\n")
    output = run_demo(state_dir)
    assert canary_key not in output
    for version in current_versions().values():
        assert version.encrypted_api_key["data"] not in output


def test_demo_prints_a_curl_for_the_demo_model(state_dir):
    output = run_demo(state_dir)
    [curl] = [line for line in output.splitlines() if line.startswith("curl ")]
    assert "http://127.0.0.1:8000/v1/chat/completions" in curl
    assert '"model": "kilo/preview-demo"' in curl


def test_demo_without_encryption_key_refuses_and_creates_nothing(state_dir, settings):
    settings.BYOK_ENCRYPTION_KEY = ""
    with pytest.raises(CommandError, match="BYOK_ENCRYPTION_KEY"):
        run_demo(state_dir)
    assert not Experiment.objects.exists()
    assert not get_user_model().objects.filter(username="admin").exists()


def test_demo_refuses_the_same_port_for_gateway_and_upstream(state_dir):
    with pytest.raises(CommandError, match="must differ"):
        run_demo(state_dir, upstream_port=8000)
    assert not Experiment.objects.exists()


def printed_token(output: str) -> str:
    [line] = [line for line in output.splitlines() if line.strip().startswith("token:")]
    return line.split(":", 1)[1].strip()


def test_demo_prints_a_gateway_token_of_its_sdk_client_user(state_dir):
    token = printed_token(run_demo(state_dir))
    row = GatewayToken.objects.get(token_sha256=hash_token(token))
    assert (row.user.username, row.revoked_at) == ("demo-client", None)
    assert not row.user.is_staff and not row.user.has_usable_password()
    assert (state_dir / "demo-gateway-token").stat().st_mode & 0o777 == 0o600


def test_demo_run_twice_prints_the_same_token(state_dir):
    first = printed_token(run_demo(state_dir))
    assert printed_token(run_demo(state_dir)) == first
    assert GatewayToken.objects.count() == 1


def test_demo_issues_a_new_token_when_the_stored_one_was_revoked(state_dir):
    first = printed_token(run_demo(state_dir))
    revoke_token(token=GatewayToken.objects.get())
    second = printed_token(run_demo(state_dir))
    assert second != first
    assert GatewayToken.objects.get(token_sha256=hash_token(second)).revoked_at is None


def test_demo_prints_sdk_snippets_with_the_token_and_the_gateway(state_dir):
    output = run_demo(state_dir)
    token = printed_token(output)
    for header in (
        "# OpenAI SDK, chat completions (pip install openai)",
        "# OpenAI SDK, streaming (pip install openai)",
        "# Anthropic SDK, messages (pip install anthropic)",
    ):
        assert header in output.splitlines()
    assert f'OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="{token}")' in output
    assert f'Anthropic(base_url="http://127.0.0.1:8000", api_key="{token}")' in output
