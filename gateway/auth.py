"""Client authentication on the request path (SPEC §8).

Verified token hashes are cached in-process for ``GATEWAY_TOKEN_CACHE_TTL_SECONDS``
so steady-state requests make no database query. Consequence: a revoked token
keeps working on a worker for at most that long — and, while the database cannot
be reached, for as long as the outage lasts (serving a user verified minutes ago
beats failing everyone); a token this worker has not verified gets 503 meanwhile.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from gateway.errors import unauthorized, unavailable
from gateway.models import GatewayToken
from gateway.tokens import hash_token

#: sha256 -> (user id or None for "no such token", monotonic expiry)
_verified: dict[str, tuple[int | None, float]] = {}
_MAX_CACHED = 100_000


def presented_token(request) -> str | None:
    """The gateway token from ``Authorization: Bearer`` or ``x-api-key``; None if neither.

    An ``Authorization`` header that is not a usable Bearer token (``Basic …``, an empty
    token, another scheme) is a 401: a client that tried to authenticate is never served
    as anonymous.
    """
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        token = value.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized()
        return token
    api_key = request.headers.get("x-api-key", "").strip()
    return api_key or None


async def _lookup(digest: str) -> int | None:
    row = await (
        GatewayToken.objects.filter(
            token_sha256=digest, revoked_at__isnull=True, user__is_active=True
        )
        .values_list("pk", "user_id")
        .afirst()
    )
    if row is None:
        return None
    token_id, user_id = row
    # Only on a cache miss, so "last used" is accurate to within the cache TTL.
    await GatewayToken.objects.filter(pk=token_id).aupdate(last_used_at=timezone.now())
    return user_id


async def authenticate(request) -> int | None:
    """The authenticated user id, None for anonymous; raises 401 for a bad token."""
    token = presented_token(request)
    if token is None:
        if not settings.GATEWAY_ALLOW_ANONYMOUS:
            raise unauthorized()
        return None
    digest = hash_token(token)
    now = time.monotonic()
    cached = _verified.get(digest)
    if cached is not None and cached[1] > now:
        user_id = cached[0]
    else:
        try:
            user_id = await _lookup(digest)
        except (OperationalError, InterfaceError):
            if cached is None:
                raise unavailable(
                    "Token verification is temporarily unavailable; retry shortly.",
                    error_kind="auth_unavailable",
                ) from None
            # The last verification, past its TTL, holds while the database is away;
            # asked again after another TTL, not on every request.
            user_id = cached[0]
        if len(_verified) >= _MAX_CACHED:
            _verified.clear()
        _verified[digest] = (user_id, now + settings.GATEWAY_TOKEN_CACHE_TTL_SECONDS)
    if user_id is None:
        raise unauthorized()
    return user_id


def forget_cached_tokens() -> None:
    _verified.clear()
