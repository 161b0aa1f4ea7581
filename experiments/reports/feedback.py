"""The feedback join: which checkpoint served each client request id."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from experiments.models import Experiment, ExperimentRequest
from experiments.reports.browser import BROWSER_COLUMNS, RequestRow, to_row
from experiments.selectors import version_labels


@dataclass
class FeedbackMatch:
    client_request_id: str
    rows: list[RequestRow]


def feedback_join(experiment: Experiment, client_request_ids: list[str]) -> list[FeedbackMatch]:
    """Which checkpoint served each client request id (retries can give several rows)."""
    labels = version_labels(experiment)
    found: dict[str, list[RequestRow]] = defaultdict(list)
    chunk = 1000
    for start in range(0, len(client_request_ids), chunk):
        for values in (
            ExperimentRequest.objects.filter(
                client_request_id__in=client_request_ids[start : start + chunk],
                variant_version_id__in=list(labels),
            )
            .order_by("created_at", "usage_id")
            .values(*BROWSER_COLUMNS)
        ):
            found[values["client_request_id"]].append(to_row(values, labels))
    return [FeedbackMatch(rid, found.get(rid, [])) for rid in client_request_ids]
