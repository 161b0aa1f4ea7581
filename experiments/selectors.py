"""Reads shared by the admin, the commands and the services (no writes here)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from django.db.models import Count, Q
from django.utils import timezone

from experiments.models import (
    ROUTING_STATUSES,
    CheckpointCheck,
    Experiment,
    ExperimentRequest,
    Variant,
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
