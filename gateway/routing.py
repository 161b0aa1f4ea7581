"""Routing, reader side (SPEC §7): membership copy, payload copies, picker, key decryption.

Freshness comes from the database. Each worker confirms the routing generation
(``experiments.models.RoutingState``, one primary-key read, on a thread of its own) at
most every ``GATEWAY_MEMBERSHIP_TTL_SECONDS``, starting ahead of time so that no request
waits for it in steady state. While the generation holds, the worker routes from its
in-process copy: a non-experimented id costs one dict lookup and no network. When it moves,
the worker takes membership and payloads from Redis only if they carry the new generation,
else rebuilds them from the database and writes them back; data with any other tag (an old
snapshot, a flush, a lost race, another host's leftovers) is never routed by.

If the database cannot be reached, the worker keeps routing by the last state it confirmed
(no routing change can commit meanwhile) for up to ``GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS``.
Past that, or when it never confirmed one, it cannot classify any id and every model
request fails closed with 503: an experimented id is never routed as if it were not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, connections

from experiments import crypto, routing_cache
from experiments.models import ExperimentStatus, subject_hash_of_digest
from gateway.blinding import CheckpointIdentifiers, checkpoint_identifiers
from gateway.errors import GatewayError, model_not_found, routing_unavailable, unavailable
from gateway.subjects import Subject

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: After a failed refresh, wait this long before trying again, so an outage does not
#: turn every request into a failing connection attempt.
FAILURE_BACKOFF_SECONDS = 0.25
#: The longest a request waits for the database to confirm the routing state or load a
#: payload; past it, the last confirmed state answers (within the outage grace) or 503.
REFRESH_WAIT_SECONDS = 2.0

_MISSING = object()


class RoutingUnavailable(Exception):
    """The routing state cannot be confirmed with the database, or a payload loaded."""


# --- picking (pure) -------------------------------------------------------------


def allocation_seed(experiment_id: str, subject_kind: str, subject_value: str) -> str:
    return f"model_exp_{str(experiment_id).lower()}_{subject_kind}_{subject_value}"


def seed_digest(seed: str) -> bytes:
    return hashlib.sha256(seed.encode("utf-8")).digest()


def bucket_of(seed: str, total_weight: int) -> int:
    return _bucket_of_digest(seed_digest(seed), total_weight)


def _bucket_of_digest(digest: bytes, total_weight: int) -> int:
    return int.from_bytes(digest[:4], "big") % total_weight


def pick_variant_and_digest(
    variants: list[dict[str, Any]], experiment_id: str, subject: Subject
) -> tuple[dict[str, Any], bytes]:
    """The variant for this subject, and the SHA-256 of its seed.

    Walk variants by id, first running total > bucket. The digest is returned so
    attribution can store it (as the subject's pseudonym) without hashing twice.
    """
    ordered = sorted(variants, key=lambda v: uuid.UUID(str(v["id"])))
    total = sum(int(v["weight"]) for v in ordered)
    if total <= 0:
        raise ValueError("no positive weight")
    digest = seed_digest(allocation_seed(experiment_id, subject.kind, subject.value))
    bucket = _bucket_of_digest(digest, total)
    running = 0
    for variant in ordered:
        running += int(variant["weight"])
        if running > bucket:
            return variant, digest
    raise AssertionError("unreachable: bucket < total weight")


def pick_variant(
    variants: list[dict[str, Any]], experiment_id: str, subject: Subject
) -> dict[str, Any]:
    """The variant for this subject (see ``pick_variant_and_digest``)."""
    return pick_variant_and_digest(variants, experiment_id, subject)[0]


# --- the decision handed to the view ----------------------------------------------


@dataclass(frozen=True)
class Route:
    public_model_id: str
    base_url: str
    api_key: str
    #: The model id sent upstream; None keeps the client's (default upstream).
    internal_id: str | None
    upstream: dict[str, Any]
    #: What tells this id's checkpoints apart (all of them, not only this one): replaced
    #: at once in upstream error text so it does not say which one served.
    identifiers: CheckpointIdentifiers
    #: Set only for experimented requests.
    version_id: str | None = None
    subject_kind: str | None = None
    #: The subject's pseudonym in attribution rows: the first 16 bytes of the
    #: SHA-256 of the bucketing seed, taken from the digest the picker computed.
    subject_hash: uuid.UUID | None = None
    #: Hundredths of a percent of requests whose answer is captured (0: none).
    capture_basis_points: int = 0

    @property
    def is_experimented(self) -> bool:
        return self.version_id is not None


@dataclass(frozen=True)
class Membership:
    """The routing state the database last confirmed to this worker."""

    generation: routing_cache.Generation
    ids: frozenset[str]
    #: Monotonic time at which the confirming database read began.
    verified_at: float
    #: public id -> payload (None: no experiment routes it), for this generation only,
    #: so a copy loaded under an older generation can never be used under a newer one.
    payloads: dict[str, dict[str, Any] | None] = field(default_factory=dict, compare=False)
    #: public id -> the load in progress, shared by every request waiting for it.
    loads: dict[str, asyncio.Task] = field(default_factory=dict, compare=False)


# --- Redis access without blocking the event loop ---------------------------------


class RoutingStore:
    """Reads routing keys the way django's cache wrote them, without blocking the loop.

    With django-redis, keys are read with redis.asyncio (same URL, same key prefix,
    values decoded by django-redis' own serializer). Without Redis (local memory
    cache) the in-process django cache is used directly.
    """

    def __init__(self) -> None:
        self._clients: dict[int, Any] = {}

    @property
    def uses_redis(self) -> bool:
        return bool(settings.REDIS_URL)

    def _client(self):
        import redis.asyncio as aioredis

        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            options = settings.CACHES["default"].get("OPTIONS", {})
            client = aioredis.from_url(
                settings.REDIS_URL,
                socket_connect_timeout=options.get("SOCKET_CONNECT_TIMEOUT", 0.5),
                socket_timeout=options.get("SOCKET_TIMEOUT", 0.5),
            )
            self._clients[loop_id] = client
        return client

    async def get(self, key: str) -> Any:
        if not self.uses_redis:
            return cache.get(key)
        raw = await self._client().get(cache.make_key(key))
        if raw is None:
            return None
        return cache.client.decode(raw)

    async def ping(self) -> bool:
        if not self.uses_redis:
            return True
        return bool(await self._client().ping())

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            try:
                await client.aclose()
            except Exception:  # closing during shutdown: nothing useful to do
                logger.debug("redis client close failed", exc_info=True)


class RoutingDatabase:
    """Runs the reader's database work on one thread of its own.

    Why its own: the generation check runs every interval in the background, and a slow or
    unreachable database must hold up nothing else (token lookups run on request threads);
    one long-lived thread also keeps one persistent connection instead of one per request.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routing-db")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _on_a_usable_connection, function, *args)

    def close(self, timeout: float = 5.0) -> None:
        """Close the thread's database connection and stop the thread (shutdown, tests).

        Waits at most ``timeout`` for a query in progress (a hung database) to end first.
        """
        executor, self._executor = self._executor, None
        if executor is not None:
            with contextlib.suppress(Exception):
                executor.submit(connections.close_all).result(timeout=timeout)
            executor.shutdown(wait=False)


def _on_a_usable_connection(function: Callable[..., T], *args: Any) -> T:
    # What Django does at the start of each request: drop a connection that broke (a
    # database failover) or aged out, so this query opens a new one.
    close_old_connections()
    return function(*args)


#: The database work of every router in this process.
routing_database = RoutingDatabase()


class Router:
    def __init__(
        self, store: RoutingStore | None = None, database: RoutingDatabase | None = None
    ) -> None:
        self.store = store or RoutingStore()
        self.database = database or routing_database
        self._membership: Membership | None = None
        self._refresh: asyncio.Task | None = None
        self._refresh_started = 0.0
        #: When the last refresh failed (None: the last one succeeded), for the backoff.
        self._failed_at: float | None = None
        #: version id -> plaintext partner key (process memory only; never Redis, never logged)
        self._keys: dict[str, str] = {}
        #: Key fingerprints already logged as undecryptable: one line each, not one per request.
        self._undecryptable_fingerprints: set[str] = set()

    async def aclose(self) -> None:
        await self.store.aclose()
        await asyncio.to_thread(self.database.close)

    # --- membership: the routing state the database last confirmed ---------------------

    async def membership(self) -> Membership:
        current = self._membership
        if current is not None:
            age = time.monotonic() - current.verified_at
            interval = settings.GATEWAY_MEMBERSHIP_TTL_SECONDS
            if age < interval:
                if age >= interval / 2:
                    # Confirm ahead of time, so no request waits for it in steady state.
                    self._start_refresh()
                return current
        return await self._membership_after_refresh()

    def _start_refresh(self) -> asyncio.Task | None:
        task = self._refresh
        if task is not None and not task.done():
            return task
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < FAILURE_BACKOFF_SECONDS:
            return None
        self._refresh_started = now
        self._refresh = asyncio.get_running_loop().create_task(self._refreshed(now))
        return self._refresh

    async def _membership_after_refresh(self) -> Membership:
        task = self._start_refresh()
        # Wait for the database (never longer than REFRESH_WAIT_SECONDS) unless a known
        # outage is under way and the last confirmed copy is still within its grace.
        if task is not None and (self._failed_at is None or self._usable() is None):
            remaining = self._refresh_started + REFRESH_WAIT_SECONDS - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), remaining)
        usable = self._usable()
        if usable is None:
            raise RoutingUnavailable()
        return usable

    def _usable(self) -> Membership | None:
        """The copy, while it may still answer: fresh, or within the outage grace."""
        current = self._membership
        usable_for = max(
            settings.GATEWAY_MEMBERSHIP_TTL_SECONDS, settings.GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS
        )
        if current is not None and time.monotonic() - current.verified_at < usable_for:
            return current
        return None

    async def _refreshed(self, started: float) -> None:
        """Confirm the generation with the database; on a change, load the new state."""
        try:
            generation = await self.database.run(routing_cache.read_generation)
        except Exception as exc:
            self._refresh_failed(exc)
            return
        current = self._membership
        if current is not None and current.generation == generation:
            self._membership = replace(current, verified_at=started)
        else:
            try:
                ids = await self._membership_ids(generation)
            except Exception as exc:
                # The database moved on but its new state cannot be loaded: the copy is
                # known to be stale, so no grace for it.
                self._membership = None
                self._refresh_failed(exc)
                return
            self._membership = Membership(generation, ids, started)
        if self._failed_at is not None:
            logger.warning("routing confirmed with the database again")
            self._failed_at = None

    def _refresh_failed(self, exc: Exception) -> None:
        if self._failed_at is None:
            logger.error(
                "routing cannot be confirmed with the database (%s); routing by the last "
                "confirmed state for up to %s s, then failing closed",
                type(exc).__name__,
                settings.GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS,
            )
        self._failed_at = time.monotonic()

    async def _membership_ids(self, generation: routing_cache.Generation) -> frozenset[str]:
        try:
            raw = await self.store.get(routing_cache.MEMBERSHIP_KEY)
            ids = routing_cache.parse_membership(raw, generation)
            if ids is not None:
                return ids
        except Exception as exc:
            logger.warning("membership read from cache failed (%s)", type(exc).__name__)
        return frozenset(await self.database.run(routing_cache.rebuild_membership, generation))

    # --- payloads: per public id, for the membership's generation only ----------------

    async def payload(self, public_model_id: str, membership: Membership) -> dict[str, Any] | None:
        cached = membership.payloads.get(public_model_id, _MISSING)
        if cached is None or (cached is not _MISSING and routing_cache.in_force(cached)):
            return cached
        # One load per id and generation, however many requests are waiting for it.
        load = membership.loads.get(public_model_id)
        if load is None or load.done():
            load = asyncio.get_running_loop().create_task(
                self._loaded_payload(public_model_id, membership)
            )
            membership.loads[public_model_id] = load
        try:
            return await asyncio.wait_for(asyncio.shield(load), REFRESH_WAIT_SECONDS)
        except TimeoutError:  # a hung database: fail closed rather than hold the request
            raise RoutingUnavailable() from None

    async def _loaded_payload(
        self, public_model_id: str, membership: Membership
    ) -> dict[str, Any] | None:
        try:
            payload = None
            try:
                raw = await self.store.get(routing_cache.payload_key(public_model_id))
                payload = routing_cache.parse_payload(raw, membership.generation)
            except Exception as exc:
                logger.warning("payload read from cache failed (%s)", type(exc).__name__)
            if payload is None:
                try:
                    payload = await self.database.run(
                        routing_cache.rebuild_payload, public_model_id, membership.generation
                    )
                except Exception as exc:
                    logger.error("payload rebuild from database failed (%s)", type(exc).__name__)
                    raise RoutingUnavailable() from None
                if payload is not None and not routing_cache.valid_payload(payload):
                    raise RoutingUnavailable()
            membership.payloads[public_model_id] = payload
            return payload
        finally:
            membership.loads.pop(public_model_id, None)

    def _partner_key(self, variant: dict[str, Any]) -> str:
        version_id = variant.get("version_id")
        cached = self._keys.get(version_id) if version_id else None
        if cached is not None:
            return cached
        envelope = variant.get("encrypted_api_key")
        if not version_id or not isinstance(envelope, dict):
            raise unavailable(
                "The model is temporarily unavailable.", error_kind="checkpoint_missing"
            )
        try:
            plaintext = crypto.decrypt_api_key(envelope)
        except crypto.EncryptionKeyError:
            logger.error("encryption key missing or malformed; experimented ids fail closed")
            raise unavailable(
                "The model is temporarily unavailable.", error_kind="encryption_key_unavailable"
            ) from None
        except crypto.DecryptionError:
            self._log_undecryptable(variant.get("key_fingerprint") or "unknown")
            raise unavailable(
                "The model is temporarily unavailable.", error_kind="key_undecryptable"
            ) from None
        self._keys[version_id] = plaintext
        return plaintext

    def _log_undecryptable(self, fingerprint: str) -> None:
        if fingerprint in self._undecryptable_fingerprints:
            return
        self._undecryptable_fingerprints.add(fingerprint)
        logger.error(
            "checkpoint partner keys encrypted under key %s cannot be decrypted with this "
            "gateway's key %s: requests routed to them answer 503. Run every process with the "
            "same BYOK_ENCRYPTION_KEY or BYOK_ENCRYPTION_KEY_FILE.",
            fingerprint,
            crypto.key_fingerprint(),
        )

    async def resolve(self, public_model_id: str, subject_of) -> Route:
        """Decide where a request goes. ``subject_of()`` is called only when needed.

        Raises GatewayError (404/503). An experimented route carries version id and subject.
        """
        try:
            membership = await self.membership()
            payload = None
            if public_model_id in membership.ids:
                payload = await self.payload(public_model_id, membership)
        except RoutingUnavailable:
            raise routing_unavailable() from None
        if payload is None or payload["status"] not in (
            ExperimentStatus.ACTIVE,
            ExperimentStatus.PAUSED,
        ):
            return default_route(public_model_id)
        if payload["status"] == ExperimentStatus.PAUSED:
            raise model_not_found(public_model_id)
        subject: Subject | None = subject_of()
        if subject is None:
            raise unavailable(
                "Cannot identify the caller for this model; send a token or a machine id.",
                error_kind="no_subject",
            )
        try:
            variant, digest = pick_variant_and_digest(
                payload["variants"], payload["experiment_id"], subject
            )
        except ValueError:
            raise unavailable(
                "The model is temporarily unavailable.", error_kind="no_variant"
            ) from None
        upstream = variant.get("upstream")
        if not isinstance(upstream, dict) or not upstream.get("base_url"):
            raise unavailable(
                "The model is temporarily unavailable.", error_kind="checkpoint_missing"
            )
        api_key = self._partner_key(variant)
        return Route(
            public_model_id=public_model_id,
            base_url=str(upstream["base_url"]).rstrip("/"),
            api_key=api_key,
            internal_id=str(upstream.get("internal_id") or public_model_id),
            upstream=upstream,
            identifiers=_identifiers_of(payload["variants"], public_model_id),
            version_id=str(variant["version_id"]),
            subject_kind=subject.kind,
            subject_hash=subject_hash_of_digest(digest),
            capture_basis_points=_capture_basis_points(payload),
        )

    async def callable_ids(self) -> list[str]:
        """Experimented public ids a client can call right now (active, not paused)."""
        membership = await self.membership()
        ids = []
        for public_model_id in sorted(membership.ids):
            payload = await self.payload(public_model_id, membership)
            if payload is not None and payload["status"] == ExperimentStatus.ACTIVE:
                ids.append(public_model_id)
        return ids


def _capture_basis_points(payload: dict[str, Any]) -> int:
    """The payload's capture rate; anything malformed (or a payload built before the rate
    existed) captures nothing."""
    value = payload.get("response_capture_basis_points", 0)
    if type(value) is not int or not 0 <= value <= 10_000:
        return 0
    return value


def _identifiers_of(variants: list[dict[str, Any]], public_model_id: str) -> CheckpointIdentifiers:
    """The identifiers of every variant's current checkpoint (built once per payload)."""
    checkpoints = []
    for variant in variants:
        upstream = variant.get("upstream")
        if isinstance(upstream, dict) and upstream.get("base_url"):
            internal_id = str(upstream.get("internal_id") or public_model_id)
            checkpoints.append((str(upstream["base_url"]).rstrip("/"), internal_id))
    return checkpoint_identifiers(tuple(checkpoints))


def default_route(public_model_id: str) -> Route:
    base_url = settings.GATEWAY_DEFAULT_UPSTREAM_BASE_URL.rstrip("/")
    if not base_url:
        raise model_not_found(public_model_id)
    return Route(
        public_model_id=public_model_id,
        base_url=base_url,
        api_key=settings.GATEWAY_DEFAULT_UPSTREAM_API_KEY,
        internal_id=None,
        upstream={},
        identifiers=checkpoint_identifiers(((base_url, None),)),
    )


router = Router()

__all__ = ["GatewayError", "Route", "Router", "RoutingUnavailable", "pick_variant", "router"]
