"""Gateway tokens: the management command and the admin never reveal a token."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from gateway.models import GatewayToken
from gateway.tokens import hash_token
from tests.factories import SuperUserFactory, UserFactory


def _run(*args) -> str:
    out = io.StringIO()
    call_command("gateway_token", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_create_prints_the_token_once_on_the_last_line_and_stores_its_hash():
    UserFactory(username="dana")
    output = _run("create", "dana", "--name", "laptop")
    token = output.strip().splitlines()[-1]
    row = GatewayToken.objects.get()
    assert row.token_sha256 == hash_token(token) and token.startswith(row.token_prefix)
    assert row.name == "laptop"
    assert token not in _run("list")


@pytest.mark.django_db
def test_create_for_unknown_user_is_refused():
    with pytest.raises(CommandError, match="No user matches .nobody."):
        _run("create", "nobody")
    assert GatewayToken.objects.count() == 0


@pytest.mark.django_db
def test_list_filters_by_user():
    UserFactory(username="erin")
    UserFactory(username="finn")
    _run("create", "erin")
    _run("create", "finn")
    listing = _run("list", "--user", "erin")
    assert "erin" in listing and "finn" not in listing


@pytest.mark.django_db
def test_revoke_by_prefix_sets_revoked_at():
    UserFactory(username="gail")
    _run("create", "gail")
    row = GatewayToken.objects.get()
    assert "Revoked" in _run("revoke", row.token_prefix)
    row.refresh_from_db()
    assert row.revoked_at is not None


@pytest.mark.django_db
def test_revoke_unknown_token_is_refused():
    with pytest.raises(CommandError, match="No token matches .mxg_nothing."):
        _run("revoke", "mxg_nothing")


@pytest.mark.django_db
def test_admin_lists_tokens_without_plaintext_or_hash(client):
    admin = SuperUserFactory(username="root")
    UserFactory(username="hugo")
    token = _run("create", "hugo").strip().splitlines()[-1]
    row = GatewayToken.objects.get()
    client.force_login(admin)
    for url in ("/admin/gateway/gatewaytoken/", f"/admin/gateway/gatewaytoken/{row.pk}/change/"):
        page = client.get(url).content.decode()
        assert row.token_prefix in page
        assert token not in page and row.token_sha256 not in page


@pytest.mark.django_db
def test_admin_revoke_action(client):
    admin = SuperUserFactory(username="root2")
    UserFactory(username="ivy")
    _run("create", "ivy")
    row = GatewayToken.objects.get()
    client.force_login(admin)
    client.post(
        "/admin/gateway/gatewaytoken/",
        {"action": "revoke", "_selected_action": [str(row.pk)]},
    )
    row.refresh_from_db()
    assert row.revoked_at is not None


# --- the admin history (who issued and revoked which token; never the token) ---------------


def _history(token: GatewayToken) -> list[tuple[str, str, int]]:
    from django.contrib.admin.models import LogEntry
    from django.contrib.contenttypes.models import ContentType

    entries = LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(GatewayToken), object_id=str(token.pk)
    ).order_by("action_time", "id")
    return [
        (entry.user.get_username(), entry.change_message, entry.action_flag) for entry in entries
    ]


@pytest.mark.django_db
def test_create_and_revoke_by_command_are_recorded_for_the_service_user():
    from django.contrib.admin.models import ADDITION, CHANGE, LogEntry

    UserFactory(username="dana")
    plaintext = _run("create", "dana", "--name", "laptop").strip().splitlines()[-1]
    token = GatewayToken.objects.get()
    _run("revoke", token.token_prefix)
    _run("revoke", token.token_prefix)  # already revoked: nothing more to record
    assert _history(token) == [
        (
            "manage.py",
            f"Created gateway token {token.token_prefix}… named 'laptop' for 'dana'.",
            ADDITION,
        ),
        ("manage.py", f"Revoked gateway token {token.token_prefix}….", CHANGE),
    ]
    stored = " ".join(
        f"{entry.object_repr} {entry.change_message}" for entry in LogEntry.objects.all()
    )
    assert plaintext not in stored
    assert plaintext[len(token.token_prefix) :][:8] not in stored
    assert token.token_sha256 not in stored


@pytest.mark.django_db
def test_by_names_the_operator_in_the_history():
    SuperUserFactory(username="olga")
    UserFactory(username="dana")
    _run("create", "dana", "--by", "olga")
    token = GatewayToken.objects.get()
    _run("revoke", str(token.pk), "--by", "olga", "--json")
    assert [who for who, _, _ in _history(token)] == ["olga", "olga"]


@pytest.mark.django_db
def test_an_unknown_by_user_is_refused_and_nothing_is_created():
    UserFactory(username="dana")
    with pytest.raises(CommandError, match="No user matches 'ghost' \\(--by\\)."):
        _run("create", "dana", "--by", "ghost")
    assert GatewayToken.objects.count() == 0
