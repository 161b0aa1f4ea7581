"""Routing caches (SPEC §7): the routing generation, the builders, and the Redis format.

The database is the authority on freshness. ``RoutingState`` holds a generation that every
routing-relevant write bumps in its own transaction (see ``signals``). Whatever is cached is
tagged with the generation read *before* the rows it was built from, so it reflects that
generation or a later one, and it is current exactly while its tag is still the database's
generation. A reader that finds another tag (an old Redis snapshot, a write-back that lost a
race, a leftover of another process) rebuilds from the database and writes back.

Two kinds of keys, through Django's cache (django-redis in production):

* ``MEMBERSHIP_KEY``: ``{"generation": n, "token": t, "ids": [...]}`` — the public ids with
  an active or paused experiment.
* ``payload_key(public_id)``: the routing payload of that id (variants in id order with
  weight, current version id, upstream JSON and the *ciphertext*; never a plaintext key;
  and the experiment's response capture rate in basis points), tagged the same way.
  ``valid_until`` is the next pending ``effective_at``: a scheduled
  checkpoint takes over at that moment without any commit, so the payload expires then.

After each commit the writer rewrites membership, so gateway workers take it from Redis
instead of each querying the database. A Redis failure is logged and swallowed: admin and
command writes must still succeed, and readers fall back to the database.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.db import transaction
from django.db.models import F, Min, OuterRef, Subquery
from django.utils import timezone

from experiments.models import (
    ROUTING_STATE_ID,
    ROUTING_STATUSES,
    Experiment,
    RoutingState,
    Variant,
    VariantVersion,
)

logger = logging.getLogger(__name__)

MEMBERSHIP_KEY = "routing:membership"
PAYLOAD_PREFIX = "routing:payload:"
#: Payloads carry the ciphertext only; they still expire so an orphan never lingers.
PAYLOAD_TTL_SECONDS = 24 * 3600


def payload_key(public_model_id: str) -> str:
    return PAYLOAD_PREFIX + public_model_id


# --- the generation ----------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    number: int
    token: str


#: Before the first routing-relevant write (no ``RoutingState`` row yet).
NO_GENERATION = Generation(0, "")


def read_generation() -> Generation:
    row = (
        RoutingState.objects.filter(pk=ROUTING_STATE_ID).values_list("generation", "token").first()
    )
    return NO_GENERATION if row is None else Generation(row[0], row[1].hex)


def bump_generation() -> None:
    """Move the generation on, inside the caller's transaction: it commits with the change.

    The row lock this takes also orders concurrent routing writes, so no two of them commit
    under the same generation.
    """
    state = RoutingState.objects.filter(pk=ROUTING_STATE_ID)
    if not state.update(generation=F("generation") + 1, token=uuid.uuid4()):
        # No row yet (a new or flushed database). Concurrent first writers meet at the
        # primary key, and get_or_create turns the loser's insert into a read.
        RoutingState.objects.get_or_create(pk=ROUTING_STATE_ID)
        state.update(generation=F("generation") + 1, token=uuid.uuid4())


def start_new_generation() -> Generation:
    """Move the generation on by itself: every gateway process reloads routing."""
    with transaction.atomic():
        bump_generation()
        return read_generation()


def _tag(generation: Generation) -> dict[str, Any]:
    return {"generation": generation.number, "token": generation.token}


def _tagged_with(value: Any, generation: Generation) -> bool:
    return (
        isinstance(value, dict)
        and value.get("generation") == generation.number
        and value.get("token") == generation.token
    )


# --- builders (read the database; the gateway calls them after reading the generation) ---


def build_membership() -> list[str]:
    return sorted(
        set(
            Experiment.objects.filter(status__in=ROUTING_STATUSES).values_list(
                "public_model_id", flat=True
            )
        )
    )


def build_payload(public_model_id: str, *, moment=None) -> dict[str, Any] | None:
    """The routing payload for a public id, or None when no experiment routes it."""
    experiment = (
        Experiment.objects.filter(public_model_id=public_model_id, status__in=ROUTING_STATUSES)
        .only("id", "status", "public_model_id", "response_capture_rate")
        .first()
    )
    if experiment is None:
        return None
    moment = moment or timezone.now()
    current = (
        VariantVersion.with_ciphertext.filter(variant=OuterRef("pk"))
        .effective_at(moment)
        .values("pk")[:1]
    )
    variants = list(
        Variant.objects.filter(experiment=experiment)
        .annotate(current_version_id=Subquery(current))
        .order_by("id")
        .values("id", "weight", "current_version_id")
    )
    version_ids = [v["current_version_id"] for v in variants if v["current_version_id"]]
    versions = {
        row["id"]: row
        for row in VariantVersion.with_ciphertext.filter(pk__in=version_ids).values(
            "id", "upstream", "encrypted_api_key", "key_fingerprint"
        )
    }
    pending = VariantVersion.objects.filter(
        variant__experiment=experiment, effective_at__gt=moment
    ).aggregate(next_effective_at=Min("effective_at"))["next_effective_at"]
    return {
        "experiment_id": str(experiment.id),
        "public_model_id": experiment.public_model_id,
        "status": experiment.status,
        "valid_until": pending.timestamp() if pending else None,
        # Hundredths of a percent of requests whose answer the gateway captures.
        "response_capture_basis_points": experiment.response_capture_basis_points,
        "variants": [
            {
                "id": str(v["id"]),
                "weight": v["weight"],
                "version_id": str(v["current_version_id"]) if v["current_version_id"] else None,
                "upstream": versions[v["current_version_id"]]["upstream"]
                if v["current_version_id"]
                else None,
                "encrypted_api_key": versions[v["current_version_id"]]["encrypted_api_key"]
                if v["current_version_id"]
                else None,
                # Lets the gateway name the key it lacks when it cannot decrypt.
                "key_fingerprint": versions[v["current_version_id"]]["key_fingerprint"]
                if v["current_version_id"]
                else None,
            }
            for v in variants
        ],
    }


def in_force(payload: dict[str, Any]) -> bool:
    """Whether no scheduled checkpoint of this payload has taken over yet."""
    valid_until = payload.get("valid_until")
    return valid_until is None or time.time() < valid_until


# --- the Redis format --------------------------------------------------------------------


def write_membership(ids: list[str], generation: Generation) -> None:
    cache.set(
        MEMBERSHIP_KEY, json.dumps({**_tag(generation), "ids": sorted(set(ids))}), timeout=None
    )


def write_payload(
    public_model_id: str, payload: dict[str, Any] | None, generation: Generation
) -> None:
    if payload is None:
        cache.delete(payload_key(public_model_id))
        return
    timeout = PAYLOAD_TTL_SECONDS
    if payload["valid_until"] is not None:
        timeout = max(1, min(timeout, math.ceil(payload["valid_until"] - time.time())))
    cache.set(payload_key(public_model_id), json.dumps({**payload, **_tag(generation)}), timeout)


def parse_membership(raw: Any, generation: Generation) -> frozenset[str] | None:
    """The ids in a cached membership value, or None unless it is tagged ``generation``."""
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else None
    except ValueError:
        return None
    if not _tagged_with(value, generation):
        return None
    ids = value.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return None
    return frozenset(ids)


def parse_payload(raw: Any, generation: Generation) -> dict[str, Any] | None:
    """A cached payload, or None unless it is well formed, tagged ``generation`` and in force."""
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else None
    except ValueError:
        return None
    if not _tagged_with(value, generation) or not valid_payload(value):
        return None
    return value if in_force(value) else None


def valid_payload(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("variants"), list):
        return False
    if not isinstance(value.get("experiment_id"), str) or "status" not in value:
        return False
    valid_until = value.get("valid_until")
    if valid_until is not None and not isinstance(valid_until, (int, float)):
        return False
    return all(isinstance(v, dict) and "id" in v and "weight" in v for v in value["variants"])


# --- rebuilding (database → cache) ---------------------------------------------------


def rebuild_membership(generation: Generation) -> list[str]:
    """Membership from the database (read after ``generation``), written back tagged."""
    ids = build_membership()
    try:
        write_membership(ids, generation)
    except Exception as exc:  # Redis down: the caller routes from the database copy anyway
        logger.warning("membership write-back failed (%s)", type(exc).__name__)
    return ids


def rebuild_payload(public_model_id: str, generation: Generation) -> dict[str, Any] | None:
    """A payload from the database (read after ``generation``), written back tagged."""
    payload = build_payload(public_model_id)
    try:
        write_payload(public_model_id, payload, generation)
    except Exception as exc:
        logger.warning("payload write-back failed (%s)", type(exc).__name__)
    return payload


def refresh() -> bool:
    """After a commit: rewrite membership under the current generation. Never raises."""
    try:
        generation = read_generation()
        write_membership(build_membership(), generation)
        return True
    except Exception as exc:  # Redis down: the write that triggered us must still land.
        logger.warning(
            "routing cache refresh failed (%s); gateway workers rebuild from the database",
            type(exc).__name__,
        )
        return False


def sync_all() -> dict[str, int]:
    """Start a new generation and rebuild membership and every payload under it.

    The new generation makes every gateway process drop its copies too, so after this
    returns they all route by what the database holds (even rows edited by hand).
    """
    generation = start_new_generation()
    ids = build_membership()
    write_membership(ids, generation)
    for public_model_id in ids:
        write_payload(public_model_id, build_payload(public_model_id), generation)
    return {"public_ids": len(ids), "generation": generation.number}


def read_membership_raw() -> str | None:
    return cache.get(MEMBERSHIP_KEY)
