"""Gateway tokens: issued once, stored as SHA-256 plus a short prefix."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid

from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.utils import timezone

from gateway.models import GatewayToken

TOKEN_PREFIX = "mxg_"  # noqa: S105 (a marker, not a secret)
#: Characters of the token kept in clear to tell tokens apart (no secret value).
VISIBLE_PREFIX_LENGTH = 12


class TokenError(Exception):
    """A refused token operation; the message is safe to print."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(*, username: str, name: str = "") -> tuple[GatewayToken, str]:
    """Issue a token for a user. Returns the row and the plaintext (shown once)."""
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise TokenError(f"No user named {username!r}.")
    if len(name) > GatewayToken._meta.get_field("name").max_length:
        raise TokenError("The token name is too long (at most 100 characters).")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = GatewayToken.objects.create(
        user=user,
        name=name,
        token_prefix=plaintext[:VISIBLE_PREFIX_LENGTH],
        token_sha256=hash_token(plaintext),
    )
    return row, plaintext


def list_tokens(*, username: str | None = None) -> QuerySet[GatewayToken]:
    tokens = GatewayToken.objects.select_related("user").order_by("-created_at")
    if username:
        tokens = tokens.filter(user__username=username)
    return tokens


def revoke_token(*, id_or_prefix: str) -> GatewayToken:
    """Revoke one token by its id or its visible prefix (must be unambiguous)."""
    needle = id_or_prefix.strip()
    if not needle:
        raise TokenError("Give a token id or prefix.")
    match = Q(token_prefix=needle)
    with contextlib.suppress(ValueError):  # not an id: match the prefix only
        match |= Q(pk=uuid.UUID(needle))
    candidates = list(GatewayToken.objects.filter(match)[:2])
    if not candidates:
        raise TokenError(f"No token with id or prefix {needle!r}.")
    if len(candidates) > 1:
        raise TokenError(f"{needle!r} matches several tokens; use the token id.")
    token = candidates[0]
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    return token
