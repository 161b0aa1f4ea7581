"""An experiment whose slots differ on purpose, for the comparison tests.

Three slots, each one checkpoint, rows written through the gateway's writer code
(``tests.report_seed.insert_requests``), so the rollups are the real ones:

* ``control`` (``rc-control``): 10% errors, total latency 1–2 s;
* ``faster`` (``rc-faster``): 2% errors, total latency 0.5–1 s, higher throughput;
* ``slower`` (``rc-slower``): 10% errors, total latency 2–4 s.

The rows come back so that tests can recompute every figure from them.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from experiments.models import AllocationSubject, Experiment, VariantVersion
from tests.factories import (
    ExperimentFactory,
    VariantFactory,
    VariantVersionFactory,
    upstream_config,
)
from tests.report_seed import SeededRequest, insert_requests

#: slot label -> (internal id, error probability, total latency range in ms)
PROFILES = {
    "control": ("rc-control", 0.10, (1000, 2000)),
    "faster": ("rc-faster", 0.02, (500, 1000)),
    "slower": ("rc-slower", 0.10, (2000, 4000)),
}


@dataclass
class ComparisonSeed:
    experiment: Experiment
    versions: dict[str, VariantVersion]  # by slot label
    requests: list[SeededRequest]


def seed_comparison(
    *, per_slot: int = 1500, seed: int = 11, start: datetime | None = None
) -> ComparisonSeed:
    rng = random.Random(seed)
    start = start or (timezone.now() - timedelta(hours=3)).replace(microsecond=0)
    experiment = ExperimentFactory(status="active", started_at=start - timedelta(days=1))
    versions = {}
    for offset, (label, (internal_id, _, _)) in enumerate(PROFILES.items()):
        slot = VariantFactory(experiment=experiment, label=label, weight=1)
        # Creation order decides the default control: "control" is made first.
        type(slot).objects.filter(pk=slot.pk).update(
            created_at=start - timedelta(days=2) + timedelta(seconds=offset)
        )
        versions[label] = VariantVersionFactory(
            variant=slot,
            upstream=upstream_config(internal_id=internal_id),
            effective_at=start - timedelta(days=1),
        )
    rows = []
    for label, (_, error_probability, (low, high)) in PROFILES.items():
        for index in range(per_slot):
            subject = f"machine-{label}-{index % 300}"
            has_error = rng.random() < error_probability
            total_ms = rng.randint(low, high)
            ttfb_ms = rng.randint(50, low // 2)
            rows.append(
                SeededRequest(
                    usage_id=uuid.uuid4(),
                    created_at=start + timedelta(seconds=index * 7200 // per_slot),
                    version_id=versions[label].pk,
                    slot_label=label,
                    subject_kind=AllocationSubject.MACHINE,
                    subject_hash=hashlib.sha256(
                        f"model_exp_{experiment.pk}_machine_{subject}".encode()
                    ).hexdigest(),
                    user_id=None,
                    client_request_id=f"msg-{label}-{index}",
                    has_error=has_error,
                    error_kind="upstream_http_500" if has_error else None,
                    error_category="upstream_5xx" if has_error else None,
                    finish_reason=None if has_error else "stop",
                    status_code=500 if has_error else 200,
                    is_stream=True,
                    ttfb_ms=ttfb_ms,
                    total_ms=total_ms,
                    input_tokens=rng.randint(10, 200),
                    output_tokens=rng.randint(100, 400),
                    body_sha256=hashlib.sha256(f"body-{label}-{index}".encode()).hexdigest(),
                )
            )
    insert_requests(rows, public_model_id=experiment.public_model_id)
    return ComparisonSeed(experiment, versions, rows)
