"""Routing caches in Redis (SPEC §7), writer side and the shared builders.

Two kinds of keys, both through Django's cache (django-redis in production):

* ``MEMBERSHIP_KEY``: ``{"generation": n, "ids": [...]}`` — the public ids with
  an active or paused experiment. Rewritten from PostgreSQL on every
  routing-relevant change; ``generation`` grows with every rewrite so gateway
  workers know to drop their in-process payload copies.
* ``payload_key(public_id)``: the routing payload of that id (variants in id
  order with weight, current version id, upstream JSON and the *ciphertext*;
  never a plaintext key), tagged with the generation it was built under.
  Deleted on change and rebuilt on demand; a payload whose tag is not the
  current generation is treated as absent.

Writes happen in ``transaction.on_commit`` (see ``signals``), so a worker can
never rebuild from a state that is about to roll back. A Redis failure is
logged and swallowed: admin and command writes must still succeed, and the
cache heals on the next change or ``manage.py sync_experiment_cache``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from django.core.cache import cache
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from experiments.models import ROUTING_STATUSES, Experiment, Variant, VariantVersion

logger = logging.getLogger(__name__)

MEMBERSHIP_KEY = "routing:membership"
GENERATION_KEY = "routing:generation"
PAYLOAD_PREFIX = "routing:payload:"
#: Payloads carry the ciphertext only; they still expire so an orphan never lingers.
PAYLOAD_TTL_SECONDS = 24 * 3600


def payload_key(public_model_id: str) -> str:
    return PAYLOAD_PREFIX + public_model_id


# --- builders (read PostgreSQL; also used by the gateway on a cache miss) -----


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
        .only("id", "status", "public_model_id")
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
    return {
        "experiment_id": str(experiment.id),
        "public_model_id": experiment.public_model_id,
        "status": experiment.status,
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


# --- writers -----------------------------------------------------------------


def _next_generation() -> int:
    try:
        return int(cache.incr(GENERATION_KEY))
    except ValueError:  # key absent (fresh Redis, flush): start above any clock-free guess
        generation = int(timezone.now().timestamp() * 1000)
        cache.set(GENERATION_KEY, generation, timeout=None)
        return generation


def write_membership(ids: Iterable[str]) -> int:
    generation = _next_generation()
    cache.set(
        MEMBERSHIP_KEY,
        json.dumps({"generation": generation, "ids": sorted(set(ids))}),
        timeout=None,
    )
    return generation


def write_payload(
    public_model_id: str, payload: dict[str, Any] | None, *, generation: int | str | None = None
) -> None:
    """Store a payload tagged with the membership generation it was built under.

    Readers accept it only while that generation is current: a worker that rebuilt a
    payload from the old state and writes it back after an invalidation cannot make
    other workers route by it (they see the newer generation and rebuild).
    """
    if payload is None:
        cache.delete(payload_key(public_model_id))
    else:
        cache.set(
            payload_key(public_model_id),
            json.dumps({**payload, "generation": generation}),
            timeout=PAYLOAD_TTL_SECONDS,
        )


#: Bound on re-writes when concurrent commits keep changing the set underneath us.
MEMBERSHIP_WRITE_ATTEMPTS = 3


def _write_membership_until_settled() -> None:
    """Write membership, then re-read the database and write again if it moved.

    Two refreshes can interleave so that the one built *before* the other's
    commit is written *after* it, leaving a stale set until the next change.
    Re-reading after our write sees every commit that preceded it, so the last
    writer to finish always leaves the current set.
    """
    current = build_membership()
    for _ in range(MEMBERSHIP_WRITE_ATTEMPTS):
        write_membership(current)
        latest = build_membership()
        if latest == current:
            return
        current = latest


def refresh(public_model_ids: Iterable[str]) -> bool:
    """Invalidate the payloads of these ids and rewrite membership. Never raises."""
    ids = {pid for pid in public_model_ids if pid}
    try:
        cache.delete_many([payload_key(pid) for pid in ids])
        _write_membership_until_settled()
        return True
    except Exception as exc:  # Redis down: the write that triggered us must still land.
        logger.warning(
            "routing cache refresh failed (%s); run sync_experiment_cache", type(exc).__name__
        )
        return False


def sync_all() -> dict[str, int]:
    """Rebuild membership and every routing payload from the database."""
    ids = build_membership()
    generation = write_membership(ids)
    for public_model_id in ids:
        write_payload(public_model_id, build_payload(public_model_id), generation=generation)
    return {"public_ids": len(ids), "generation": generation}


def read_membership_raw() -> str | None:
    return cache.get(MEMBERSHIP_KEY)
