"""Reads of the control plane: one home for the lookups the admin, the commands and the
report pages share. None selects the ``encrypted_api_key`` column (SPEC §6): every
version query goes through ``VariantVersion.objects``, which defers it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import (
    BooleanField,
    Count,
    ExpressionWrapper,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
)

from experiments.models import Experiment, Variant, VariantVersion


def current_version(variant: Variant, *, moment=None, with_ciphertext: bool = False):
    """The checkpoint a slot serves at ``moment`` (default now): greatest
    (effective_at, id) among its versions effective by then (SPEC §2)."""
    manager = VariantVersion.with_ciphertext if with_ciphertext else VariantVersion.objects
    return manager.filter(variant=variant).effective_at(moment).first()


def current_version_with_key_state(variant: Variant) -> VariantVersion | None:
    """``current_version`` with ``key_configured`` computed in SQL, so the ciphertext
    itself is never selected."""
    return (
        VariantVersion.objects.filter(variant=variant)
        .effective_at()
        .annotate(
            key_configured=ExpressionWrapper(
                Q(encrypted_api_key__isnull=False), output_field=BooleanField()
            )
        )
        .first()
    )


def with_variant_counts(experiments: QuerySet[Experiment]) -> QuerySet[Experiment]:
    """Experiments annotated with ``variant_count`` (one query for a whole list)."""
    return experiments.select_related("created_by").annotate(
        variant_count=Count("variants", distinct=True)
    )


def with_version_history(variants: QuerySet[Variant]) -> QuerySet[Variant]:
    """Slots with their version history (newest first, ``versions``) and
    ``current_version_id``, in two queries for any number of slots."""
    history = VariantVersion.objects.select_related("created_by").order_by("-effective_at", "-id")
    current = VariantVersion.objects.filter(variant=OuterRef("pk")).effective_at()
    return variants.annotate(
        current_version_id=Subquery(current.values("pk")[:1])
    ).prefetch_related(Prefetch("versions", queryset=history))


@dataclass
class CheckpointSummary:
    """One checkpoint (variant version) of a slot and the period it served."""

    version_id: uuid.UUID
    slot_id: uuid.UUID
    slot_label: str
    internal_id: str
    effective_from: datetime
    effective_until: datetime | None  # None: the slot's current checkpoint


@dataclass(frozen=True)
class SlotSummary:
    slot_id: uuid.UUID
    label: str
    weight: int
    expected_share: float
    #: In effective order, oldest first.
    checkpoints: list[CheckpointSummary] = field(default_factory=list)


def _internal_id(upstream) -> str:
    return str(upstream.get("internal_id", "")) if isinstance(upstream, dict) else ""


def slot_histories(experiment: Experiment) -> list[SlotSummary]:
    """Slots in bucket order, each with its checkpoint history and effective periods."""
    variants = list(
        Variant.objects.filter(experiment=experiment).order_by("id").values("id", "label", "weight")
    )
    total_weight = sum(v["weight"] for v in variants) or 1
    versions_by_slot: dict[uuid.UUID, list[dict]] = defaultdict(list)
    for version in (
        VariantVersion.objects.filter(variant__experiment=experiment)
        .order_by("effective_at", "id")
        .values("id", "variant_id", "upstream", "effective_at")
    ):
        versions_by_slot[version["variant_id"]].append(version)
    slots = []
    for variant in variants:
        history = versions_by_slot.get(variant["id"], [])
        checkpoints = [
            CheckpointSummary(
                version_id=version["id"],
                slot_id=variant["id"],
                slot_label=variant["label"],
                internal_id=_internal_id(version["upstream"]),
                effective_from=version["effective_at"],
                effective_until=history[index + 1]["effective_at"]
                if index + 1 < len(history)
                else None,
            )
            for index, version in enumerate(history)
        ]
        slots.append(
            SlotSummary(
                slot_id=variant["id"],
                label=variant["label"],
                weight=variant["weight"],
                expected_share=variant["weight"] / total_weight,
                checkpoints=checkpoints,
            )
        )
    return slots


def version_labels(experiment: Experiment) -> dict[uuid.UUID, tuple[uuid.UUID, str, str]]:
    """version id -> (slot id, slot label, internal id), for every checkpoint."""
    return {
        row["id"]: (row["variant_id"], row["variant__label"], _internal_id(row["upstream"]))
        for row in VariantVersion.objects.filter(variant__experiment=experiment).values(
            "id", "variant_id", "variant__label", "upstream"
        )
    }
