"""Reads shared by the admin, the commands and the services (no writes here)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Q
from django.utils import timezone

from experiments.models import CheckpointCheck, ExperimentRequest

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
