"""Gateway tokens in the admin (issue #9): issued for a user and shown once with a copy
button; revoked from the token's page through the service the command uses."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from gateway.models import GatewayToken
from gateway.tokens import create_token, hash_token
from tests.factories import StaffUserFactory, UserFactory

pytestmark = pytest.mark.django_db

ADD = "admin:gateway_gatewaytoken_add"


def detail_url(token: GatewayToken) -> str:
    return reverse("admin:gateway_gatewaytoken_change", args=[token.pk])


def revoke_url(token: GatewayToken) -> str:
    return reverse("admin:gateway_gatewaytoken_revoke", args=[token.pk])


def shown_token(response) -> str:
    return re.search(r'<code id="mx-token"[^>]*>([^<]+)</code>', response.content.decode())[1]


def test_adding_a_token_shows_it_once_with_a_copy_button(admin_client):
    dana = UserFactory(username="dana")
    response = admin_client.post(reverse(ADD), {"user": dana.pk, "name": "laptop"})
    assert response.status_code == 200
    plaintext = shown_token(response)
    token = GatewayToken.objects.get()
    assert (token.user, token.name, token.token_sha256) == (dana, "laptop", hash_token(plaintext))
    assert 'id="mx-copy-token"' in response.content.decode()
    assert "no-store" in response["Cache-Control"]  # never kept by a browser or a proxy
    for url in (detail_url(token), reverse("admin:gateway_gatewaytoken_changelist")):
        page = admin_client.get(url).content.decode()
        assert plaintext not in page
        assert token.token_sha256 not in page


def test_the_add_page_starts_from_the_user_it_was_opened_for(admin_client):
    erin = UserFactory(username="erin")
    page = admin_client.get(reverse(ADD), {"user": erin.pk}).content.decode()
    assert re.search(rf'<option value="{erin.pk}" selected>erin</option>', page)


def test_a_users_page_links_to_adding_a_token_for_them(admin_client):
    finn = UserFactory(username="finn")
    page = admin_client.get(reverse("admin:auth_user_change", args=[finn.pk])).content.decode()
    assert f'href="{reverse(ADD)}?user={finn.pk}"' in page


def test_a_token_needs_a_user(admin_client):
    response = admin_client.post(reverse(ADD), {"name": "orphan"})
    assert response.context["form"].errors == {"user": ["This field is required."]}
    assert not GatewayToken.objects.exists()


def test_revoke_from_the_token_page_confirms_then_revokes(admin_client):
    token, _ = create_token(user=UserFactory(username="gail"))
    assert f'href="{revoke_url(token)}"' in admin_client.get(detail_url(token)).content.decode()
    confirmation = admin_client.get(revoke_url(token)).content.decode()
    assert "cannot be restored" in confirmation
    token.refresh_from_db()
    assert token.revoked_at is None
    response = admin_client.post(revoke_url(token), follow=True)
    assert response.redirect_chain == [(detail_url(token), 302)]
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert f'href="{revoke_url(token)}"' not in response.content.decode()


def test_revoking_again_keeps_the_first_revocation_time(admin_client):
    token, _ = create_token(user=UserFactory(username="hugo"))
    admin_client.post(revoke_url(token))
    token.refresh_from_db()
    first = token.revoked_at
    admin_client.post(
        reverse("admin:gateway_gatewaytoken_changelist"),
        {"action": "revoke", "_selected_action": [str(token.pk)]},
    )
    token.refresh_from_db()
    assert token.revoked_at == first


def test_a_viewer_can_neither_add_nor_revoke(client):
    viewer = StaffUserFactory()
    viewer.user_permissions.add(Permission.objects.get(codename="view_gatewaytoken"))
    client.force_login(viewer)
    token, _ = create_token(user=UserFactory(username="ivy"))
    assert client.get(reverse(ADD)).status_code == 403
    assert client.post(reverse(ADD), {"user": token.user_id}).status_code == 403
    assert client.post(revoke_url(token)).status_code == 403
    token.refresh_from_db()
    assert token.revoked_at is None
    assert GatewayToken.objects.count() == 1


def test_adding_and_revoking_in_the_admin_are_in_the_tokens_history_without_the_token(
    admin_client,
):
    from django.contrib.admin.models import LogEntry

    dana = UserFactory(username="dana")
    plaintext = shown_token(admin_client.post(reverse(ADD), {"user": dana.pk, "name": "ci"}))
    token = GatewayToken.objects.get()
    admin_client.post(revoke_url(token))
    entries = LogEntry.objects.filter(object_id=str(token.pk)).order_by("action_time", "id")
    assert [(e.user.username, e.change_message) for e in entries] == [
        ("admin", f"Created gateway token {token.token_prefix}… named 'ci' for 'dana'."),
        ("admin", f"Revoked gateway token {token.token_prefix}…."),
    ]
    history = admin_client.get(
        reverse("admin:gateway_gatewaytoken_history", args=[token.pk])
    ).content.decode()
    assert f"Created gateway token {token.token_prefix}" in history
    assert "Revoked gateway token" in history
    assert plaintext not in history and token.token_sha256 not in history
    assert plaintext not in " ".join(f"{e.object_repr} {e.change_message}" for e in entries)


def test_revoking_with_the_bulk_action_is_recorded_per_token(admin_client):
    from django.contrib.admin.models import LogEntry

    tokens = [create_token(user=UserFactory(username=f"u{n}"))[0] for n in range(2)]
    admin_client.post(
        reverse("admin:gateway_gatewaytoken_changelist"),
        {"action": "revoke", "_selected_action": [str(token.pk) for token in tokens]},
    )
    for token in tokens:
        assert LogEntry.objects.filter(
            object_id=str(token.pk), change_message__startswith="Revoked", user__username="admin"
        ).exists()
