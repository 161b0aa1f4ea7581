"""Gateway tokens: issued once, stored as SHA-256 plus a short prefix."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid

from django.contrib.admin.models import ADDITION, CHANGE
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from experiments.services import record_history
from gateway.models import GatewayToken

TOKEN_PREFIX = "mxg_"  # noqa: S105 (a marker, not a secret)
#: Characters of the token kept in clear to tell tokens apart (no secret value).
VISIBLE_PREFIX_LENGTH = 12


class TokenError(Exception):
    """A refused token operation; the message is safe to print."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(*, user, name: str = "", by=None) -> tuple[GatewayToken, str]:
    """Issue a token for a user. Returns the row and the plaintext (shown once, never stored).

    The admin history records who issued it (``by``; the service user for a command run
    without ``--by``), naming the token by its visible prefix only.
    """
    if not user.is_active:
        raise TokenError(f"User {user.get_username()!r} is inactive; a token would not work.")
    name = name.strip()
    if len(name) > GatewayToken._meta.get_field("name").max_length:
        raise TokenError("The token name is too long (at most 100 characters).")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        row = GatewayToken.objects.create(
            user=user,
            name=name,
            token_prefix=plaintext[:VISIBLE_PREFIX_LENGTH],
            token_sha256=hash_token(plaintext),
        )
        named = f" named {name!r}" if name else ""
        record_history(
            obj=row,
            by=by,
            action=ADDITION,
            message=f"Created gateway token {row.token_prefix}…{named} for "
            f"{user.get_username()!r}.",
        )
    return row, plaintext


def revoke_token(*, token: GatewayToken, by=None) -> GatewayToken:
    """Revoke a token (a no-op when it already is). Workers stop accepting it within
    ``GATEWAY_TOKEN_CACHE_TTL_SECONDS``. A revocation is recorded in the admin history."""
    with transaction.atomic():
        revoked = GatewayToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        token.refresh_from_db(fields=["revoked_at"])
        if revoked:
            record_history(
                obj=token,
                by=by,
                action=CHANGE,
                message=f"Revoked gateway token {token.token_prefix}….",
            )
    return token


def token_user(username: str):
    """The user a command names, or a refusal in the commands' wording."""
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise TokenError(f"No user matches {username!r}.")
    return user


def list_tokens(*, username: str | None = None) -> QuerySet[GatewayToken]:
    tokens = GatewayToken.objects.select_related("user").order_by("-created_at")
    if username:
        tokens = tokens.filter(user__username=username)
    return tokens


def find_token(id_or_prefix: str) -> GatewayToken:
    """One token by its id or its visible prefix; a refusal when none or several match."""
    needle = id_or_prefix.strip()
    if not needle:
        raise TokenError("Give a token id or prefix.")
    match = Q(token_prefix__startswith=needle)
    with contextlib.suppress(ValueError):  # not an id: match the prefix only
        match |= Q(pk=uuid.UUID(needle))
    candidates = list(GatewayToken.objects.select_related("user").filter(match)[:11])
    if not candidates:
        raise TokenError(f"No token matches {needle!r}.")
    if len(candidates) > 1:
        shown = ", ".join(
            f"{token.token_prefix}… ({token.user.get_username()})" for token in candidates[:10]
        )
        more = " and more" if len(candidates) > 10 else ""
        raise TokenError(f"{needle!r} matches several tokens: {shown}{more}; give the token id.")
    return candidates[0]
