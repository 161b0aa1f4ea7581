"""Reads of the control plane: one home for the lookups the admin, the commands and the
report pages share. None selects the ``encrypted_api_key`` column (SPEC §6): every
version query goes through ``VariantVersion.objects``, which defers it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from django.db.models import (
    BooleanField,
    Count,
    ExpressionWrapper,
    F,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Window,
)
from django.utils import timezone

from experiments.models import (
    ROUTING_STATUSES,
    CheckpointCheck,
    Experiment,
    ExperimentRequest,
    Variant,
    VariantVersion,
    checkpoint_label,
    version_name,
)

# --- checkpoints -----------------------------------------------------------------------


def latest_checks(version_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, CheckpointCheck]:
    """The newest connection test of each of these checkpoint versions (one query)."""
    latest: dict[uuid.UUID, CheckpointCheck] = {}
    checks = CheckpointCheck.objects.filter(version_id__in=list(version_ids)).order_by(
        "version_id", "-checked_at", "-id"
    )
    for check in checks:
        latest.setdefault(check.version_id, check)
    return latest


# --- traffic -----------------------------------------------------------------------------

#: The window of the changelist's traffic columns.
RECENT_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Traffic:
    requests: int = 0
    errors: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


def recent_traffic(
    experiment_ids: Iterable[uuid.UUID], *, since: datetime | None = None
) -> dict[uuid.UUID, Traffic]:
    """Attributed requests and errors per experiment since ``since`` (default: 24 h ago).

    One aggregate query over the attribution rows for a page of experiments; the place
    to switch to pre-aggregated rollups once they exist.
    """
    since = since or timezone.now() - RECENT_WINDOW
    rows = (
        ExperimentRequest.objects.filter(
            variant_version__variant__experiment_id__in=list(experiment_ids),
            created_at__gte=since,
        )
        .values("variant_version__variant__experiment_id")
        .annotate(requests=Count("pk"), errors=Count("pk", filter=Q(has_error=True)))
        .order_by()
    )
    return {
        row["variant_version__variant__experiment_id"]: Traffic(row["requests"], row["errors"])
        for row in rows
    }


# --- finding what operators type: ids, id prefixes, public model ids, EXPERIMENT:LABEL ----

#: At most this many candidates are named in an ambiguity message.
SHOWN_CANDIDATES = 10


class NotFound(Exception):
    """Nothing, or more than one thing, matches what was typed. The message is one line."""


def _uuid_prefix(reference: str) -> str | None:
    """``reference`` as the start of a canonical UUID (dashes where UUIDs have them), or None
    when it cannot be one. "0123456789ab" and "01234567-89ab" give the same prefix."""
    digits = reference.replace("-", "").lower()
    if not digits or len(digits) > 32 or any(ch not in "0123456789abcdef" for ch in digits):
        return None
    groups, start = [], 0
    for size in (8, 4, 4, 4, 12):
        if start < len(digits):
            groups.append(digits[start : start + size])
        start += size
    return "-".join(groups)


Found = TypeVar("Found")


def _one(
    kind: str, reference: str, candidates: list[Found], describe: Callable[[Found], str]
) -> Found:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotFound(f"No {kind} matches {reference!r}.")
    shown = "; ".join(describe(candidate) for candidate in candidates[:SHOWN_CANDIDATES])
    hidden = len(candidates) - SHOWN_CANDIDATES
    more = f"; and {hidden} more" if hidden > 0 else ""
    raise NotFound(
        f"{reference!r} matches {len(candidates)} {kind}s: {shown}{more}. Give more of the id."
    )


def _describe_experiment(experiment: Experiment) -> str:
    return f"{experiment.pk} ({experiment.public_model_id}, {experiment.status})"


def find_experiment(reference: str) -> Experiment:
    """The experiment an operator means: its UUID, a unique prefix of it, or its public
    model id (the active or paused experiment on it, else the only one)."""
    reference = reference.strip()
    if not reference:
        raise NotFound("Give an experiment id, a prefix of it, or a public model id.")
    matches: dict[uuid.UUID, Experiment] = {}
    prefix = _uuid_prefix(reference)
    if prefix:
        matches.update(
            (e.pk, e) for e in Experiment.objects.filter(pk__startswith=prefix).order_by("pk")
        )
    on_id = list(Experiment.objects.filter(public_model_id=reference).order_by("-created_at"))
    routing = [e for e in on_id if e.status in ROUTING_STATUSES]
    matches.update((e.pk, e) for e in routing or on_id)
    return _one("experiment", reference, list(matches.values()), _describe_experiment)


def find_variant(reference: str) -> Variant:
    """The variant an operator means: its UUID, a unique prefix of it, or EXPERIMENT:LABEL
    (EXPERIMENT as ``find_experiment`` takes it)."""
    reference = reference.strip()
    if not reference:
        raise NotFound("Give a variant id, a prefix of it, or EXPERIMENT:LABEL.")
    variants = Variant.objects.select_related("experiment")
    experiment_reference, colon, label = reference.rpartition(":")
    if colon:
        experiment = find_experiment(experiment_reference)
        variant = variants.filter(experiment=experiment, label=label).first()
        if variant is None:
            labels = ", ".join(
                experiment.variants.order_by("created_at").values_list("label", flat=True)
            )
            raise NotFound(
                f"No variant matches {reference!r}: experiment {experiment.pk} has "
                f"{'slots ' + labels if labels else 'no slots'}."
            )
        return variant
    prefix = _uuid_prefix(reference)
    candidates = list(variants.filter(pk__startswith=prefix).order_by("pk")) if prefix else []
    return _one(
        "variant",
        reference,
        candidates,
        lambda v: f"{v.pk} ({v.experiment.public_model_id}:{v.label})",
    )


def control_slot(experiment: Experiment) -> Variant | None:
    """The slot every comparison is made against: the one marked ``is_control``, else the
    first-created slot; None for an experiment without slots."""
    return (
        Variant.objects.filter(experiment=experiment)
        .order_by("-is_control", "created_at", "id")
        .first()
    )


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
    """Slots with their version history (newest first, ``versions``, each with its
    connection tests newest first in ``recent_checks``), ``current_version_id`` and the
    experiment's ``total_weight``, in three queries for any number of slots."""
    checks = CheckpointCheck.objects.order_by("-checked_at", "-id")
    history = (
        VariantVersion.objects.select_related("created_by")
        .prefetch_related(Prefetch("checks", queryset=checks, to_attr="recent_checks"))
        .order_by("-effective_at", "-id")
    )
    current = VariantVersion.objects.filter(variant=OuterRef("pk")).effective_at()
    return variants.annotate(
        current_version_id=Subquery(current.values("pk")[:1]),
        total_weight=Window(Sum("weight"), partition_by=[F("experiment_id")]),
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
    #: The slot's number for it, and its key rotation within that number (0: none).
    version_number: int = 1
    key_rotation: int = 0

    @property
    def key_rotated(self) -> bool:
        return self.key_rotation > 0

    @property
    def version_name(self) -> str:
        """``v2``, ``v2.1``."""
        return version_name(self.version_number, self.key_rotation)

    @property
    def label(self) -> str:
        """``rc1 v2``, ``rc1 v2.1 · key rotated``: what tables, charts and exports call it."""
        return checkpoint_label(self.slot_label, self.version_number, self.key_rotation)


@dataclass(frozen=True)
class SlotSummary:
    slot_id: uuid.UUID
    label: str
    weight: int
    expected_share: float
    #: In effective order, oldest first.
    checkpoints: list[CheckpointSummary] = field(default_factory=list)
    #: The experiment's control slot (``control_slot``).
    is_control: bool = False


def _internal_id(upstream) -> str:
    return str(upstream.get("internal_id", "")) if isinstance(upstream, dict) else ""


def slot_histories(experiment: Experiment) -> list[SlotSummary]:
    """Slots in bucket order, each with its checkpoint history and effective periods."""
    variants = list(
        Variant.objects.filter(experiment=experiment)
        .order_by("id")
        .values("id", "label", "weight", "is_control", "created_at")
    )
    control = min(
        variants, key=lambda v: (not v["is_control"], v["created_at"], v["id"]), default=None
    )
    total_weight = sum(v["weight"] for v in variants) or 1
    versions_by_slot: dict[uuid.UUID, list[dict]] = defaultdict(list)
    for version in (
        VariantVersion.objects.filter(variant__experiment=experiment)
        .order_by("effective_at", "id")
        .values("id", "variant_id", "upstream", "effective_at", "version_number", "key_rotation")
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
                version_number=version["version_number"],
                key_rotation=version["key_rotation"],
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
                is_control=variant is control,
            )
        )
    return slots


@dataclass(frozen=True)
class VersionIdentity:
    """Who a checkpoint is, as the request browser and detail name it."""

    slot_id: uuid.UUID
    slot_label: str
    internal_id: str
    version_number: int
    key_rotation: int

    @property
    def key_rotated(self) -> bool:
        return self.key_rotation > 0

    @property
    def label(self) -> str:
        return checkpoint_label(self.slot_label, self.version_number, self.key_rotation)


def version_labels(experiment: Experiment) -> dict[uuid.UUID, VersionIdentity]:
    """version id -> its slot, internal id and number, for every checkpoint (one query)."""
    return {
        row["id"]: VersionIdentity(
            slot_id=row["variant_id"],
            slot_label=row["variant__label"],
            internal_id=_internal_id(row["upstream"]),
            version_number=row["version_number"],
            key_rotation=row["key_rotation"],
        )
        for row in VariantVersion.objects.filter(variant__experiment=experiment).values(
            "id", "variant_id", "variant__label", "upstream", "version_number", "key_rotation"
        )
    }


def version_upstreams(experiment: Experiment) -> dict[uuid.UUID, dict]:
    """version id -> its upstream configuration (never the key: the JSON holds none and
    the ciphertext column is not selected), for every checkpoint of the experiment."""
    return {
        row["id"]: row["upstream"] if isinstance(row["upstream"], dict) else {}
        for row in VariantVersion.objects.filter(variant__experiment=experiment).values(
            "id", "upstream"
        )
    }
