"""Routing, reader side (SPEC §7): membership copy, payload copy, picker, key decryption.

Steady state for a non-experimented id: one dict lookup in the in-process
membership copy, no network. The copy is refreshed from Redis at most every
``GATEWAY_MEMBERSHIP_TTL_SECONDS``; on a miss, a corrupt value or a Redis error it is
rebuilt from PostgreSQL and written back. If neither answers the worker cannot
classify any id and every model request fails closed with 503: an experimented
id is never routed as if it were not experimented.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from experiments import crypto, routing_cache
from experiments.models import ExperimentStatus, subject_hash_of_digest
from gateway.blinding import CheckpointIdentifiers, checkpoint_identifiers
from gateway.errors import GatewayError, model_not_found, routing_unavailable, unavailable
from gateway.subjects import Subject

logger = logging.getLogger(__name__)

#: After both Redis and PostgreSQL failed, wait this long before trying again,
#: so an outage does not turn every request into two failing connection attempts.
FAILURE_BACKOFF_SECONDS = 0.25


class RoutingUnavailable(Exception):
    """Neither Redis nor PostgreSQL could answer."""


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

    @property
    def is_experimented(self) -> bool:
        return self.version_id is not None


@dataclass(frozen=True)
class Membership:
    generation: str
    ids: frozenset[str]
    fetched_at: float


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


def _parse_membership(raw: Any) -> tuple[str, frozenset[str]] | None:
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else None
        if not isinstance(value, dict):
            return None
        generation, ids = value["generation"], value["ids"]
        if not isinstance(generation, int) or not isinstance(ids, list):
            return None
        if not all(isinstance(i, str) for i in ids):
            return None
        return str(generation), frozenset(ids)
    except (KeyError, TypeError, ValueError):
        return None


def _valid_payload(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("variants"), list):
        return False
    if not isinstance(value.get("experiment_id"), str) or "status" not in value:
        return False
    return all(isinstance(v, dict) and "id" in v and "weight" in v for v in value["variants"])


_local_generations = itertools.count(1)


def _membership_from_database() -> tuple[str, frozenset[str]]:
    ids = routing_cache.build_membership()
    try:
        generation = str(routing_cache.write_membership(ids))
    except Exception as exc:  # Redis down: serve from the database copy anyway
        logger.warning("membership write-back failed (%s)", type(exc).__name__)
        generation = f"local-{next(_local_generations)}"
    return generation, frozenset(ids)


def _payload_from_database(public_model_id: str, generation: str) -> dict[str, Any] | None:
    """Build from PostgreSQL (read after ``generation`` was learned) and write back tagged."""
    payload = routing_cache.build_payload(public_model_id)
    try:
        routing_cache.write_payload(
            public_model_id, payload, generation=int(generation) if generation.isdigit() else None
        )
    except Exception as exc:
        logger.warning("payload write-back failed (%s)", type(exc).__name__)
    return payload


class Router:
    def __init__(self, store: RoutingStore | None = None) -> None:
        self.store = store or RoutingStore()
        self._membership: Membership | None = None
        self._failed_at: float | None = None
        self._locks: dict[int, asyncio.Lock] = {}
        #: public id -> (generation, payload or None)
        self._payloads: dict[str, tuple[str, dict[str, Any] | None]] = {}
        #: version id -> plaintext partner key (process memory only; never Redis, never logged)
        self._keys: dict[str, str] = {}
        #: Key fingerprints already logged as undecryptable: one line each, not one per request.
        self._undecryptable_fingerprints: set[str] = set()

    def reset(self) -> None:
        self._membership = None
        self._failed_at = None
        self._payloads.clear()
        self._keys.clear()
        self._undecryptable_fingerprints.clear()

    def _lock(self) -> asyncio.Lock:
        loop_id = id(asyncio.get_running_loop())
        lock = self._locks.get(loop_id)
        if lock is None:
            lock = self._locks[loop_id] = asyncio.Lock()
        return lock

    def _fresh(self, now: float) -> Membership | None:
        current = self._membership
        ttl = settings.GATEWAY_MEMBERSHIP_TTL_SECONDS
        if current is not None and now - current.fetched_at < ttl:
            return current
        return None

    async def membership(self) -> Membership:
        current = self._fresh(time.monotonic())
        if current is not None:
            return current
        async with self._lock():
            now = time.monotonic()
            current = self._fresh(now)
            if current is not None:
                return current
            if self._failed_at is not None and now - self._failed_at < FAILURE_BACKOFF_SECONDS:
                raise RoutingUnavailable()
            parsed = None
            try:
                parsed = _parse_membership(await self.store.get(routing_cache.MEMBERSHIP_KEY))
            except Exception as exc:
                logger.warning("membership read from cache failed (%s)", type(exc).__name__)
            if parsed is None:
                try:
                    parsed = await sync_to_async(_membership_from_database)()
                except Exception as exc:
                    logger.error("membership rebuild from database failed (%s)", type(exc).__name__)
                    self._membership = None
                    self._failed_at = time.monotonic()
                    raise RoutingUnavailable() from None
            generation, ids = parsed
            if self._membership is None or self._membership.generation != generation:
                self._payloads.clear()
            self._membership = Membership(generation, ids, time.monotonic())
            self._failed_at = None
            return self._membership

    async def payload(self, public_model_id: str, generation: str) -> dict[str, Any] | None:
        cached = self._payloads.get(public_model_id)
        if cached is not None and cached[0] == generation:
            return cached[1]
        payload: Any = None
        found = False
        try:
            raw = await self.store.get(routing_cache.payload_key(public_model_id))
            if raw is not None:
                payload = json.loads(raw)
                # Built under another generation: possibly from a state since changed.
                found = _valid_payload(payload) and str(payload.get("generation")) == generation
        except Exception as exc:
            logger.warning("payload read from cache failed (%s)", type(exc).__name__)
        if not found:
            try:
                payload = await sync_to_async(_payload_from_database)(public_model_id, generation)
            except Exception as exc:
                logger.error("payload rebuild from database failed (%s)", type(exc).__name__)
                raise RoutingUnavailable() from None
            if payload is not None and not _valid_payload(payload):
                raise RoutingUnavailable()
        self._payloads[public_model_id] = (generation, payload)
        return payload

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
                payload = await self.payload(public_model_id, membership.generation)
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
        )

    async def callable_ids(self) -> list[str]:
        """Experimented public ids a client can call right now (active, not paused)."""
        membership = await self.membership()
        ids = []
        for public_model_id in sorted(membership.ids):
            payload = await self.payload(public_model_id, membership.generation)
            if payload is not None and payload["status"] == ExperimentStatus.ACTIVE:
                ids.append(public_model_id)
        return ids


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
