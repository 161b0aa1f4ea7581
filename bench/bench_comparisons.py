"""What the comparisons against the control cost on top of the figures, and how the
always-valid intervals behave under daily peeking.

No database: checkpoints' figures are made in memory as the rollups would give them
(exact sums, and log-bucket histograms with as many bins as real latencies fill), so this
times ``compare_to_control`` alone: the mixture intervals, the percentile rank bounds with
their p-value bisection, and Holm.

Then it simulates A/A experiments (no difference between the checkpoints) looked at every
day for 30 days and prints how often any day's interval excluded 0: the always-valid
sequence against the fixed-n 95% interval looked at the same way.

    python bench/bench_comparisons.py [--slots 3] [--experiments 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

import numpy as np  # noqa: E402

from experiments import significance  # noqa: E402
from experiments.models import LatencyMetric  # noqa: E402
from experiments.reports.figures import CheckpointStats, SlotStats  # noqa: E402
from experiments.reports.histogram import key_of, percentile  # noqa: E402
from experiments.reports.statistics import compare_to_control  # noqa: E402


def checkpoint(label: str, rng: np.random.Generator, requests: int, shift: float):
    stats = CheckpointStats(
        version_id=uuid.uuid4(),
        slot_id=uuid.uuid4(),
        slot_label=label,
        internal_id=f"rc-{label}",
        effective_from=datetime(2026, 11, 1, tzinfo=UTC),
        effective_until=None,
    )
    latencies = rng.lognormal(7 + shift, 0.8, size=requests)
    throughput = rng.lognormal(4.5 - shift, 0.5, size=requests)
    stats.requests = requests
    stats.errors = int(rng.binomial(requests, 0.05))
    stats.total_samples = requests
    stats.total_mean = float(latencies.mean())
    stats.total_variance = float(latencies.var(ddof=1))
    for metric, values in (
        (LatencyMetric.TOTAL, latencies),
        (LatencyMetric.THROUGHPUT, throughput),
    ):
        bins = sorted(Counter(key_of(float(v)) for v in values).items())
        stats.histograms[int(metric)] = bins
        p50, p95 = percentile(bins, 0.5), percentile(bins, 0.95)
        if metric == LatencyMetric.TOTAL:
            stats.total_p50, stats.total_p95 = p50, p95
        else:
            stats.throughput_p50, stats.throughput_p95 = p50, p95
    return stats


def time_comparisons(slots: int, requests: int) -> None:
    rng = np.random.default_rng(1)
    checkpoints = [checkpoint(f"slot{i}", rng, requests, 0.02 * i) for i in range(slots)]
    slot_stats = [
        SlotStats(c.slot_id, c.slot_label, 1, 1 / slots, checkpoints=[c], is_control=i == 0)
        for i, c in enumerate(checkpoints)
    ]
    bins = len(checkpoints[0].histograms[int(LatencyMetric.TOTAL)])
    runs = []
    for _ in range(20):
        # Fresh figures each run, as each page view reads them: nothing cached between runs.
        for slot in slot_stats:
            slot.checkpoints = [dataclasses.replace(c) for c in slot.checkpoints]
        current = {s.slot_id: s.checkpoints[0] for s in slot_stats}
        started = time.perf_counter()
        result = compare_to_control(slot_stats, current=current)
        runs.append(time.perf_counter() - started)
    print(
        f"compare_to_control: {slots} slots, {requests:,} requests each ({bins} latency bins), "
        f"{len(result.rows)} comparisons: median {np.median(runs) * 1000:.1f} ms"
    )


def simulate(experiments: int, days: int = 30, per_day: int = 200) -> None:
    rng = np.random.default_rng(20261129)
    rho, alpha = significance.RHO, significance.ALPHA
    errors = rng.binomial(per_day, 0.08, size=(2, experiments, days)).cumsum(axis=2)
    n = per_day * np.arange(1, days + 1)
    p_a, p_b = errors[0] / n, errors[1] / n
    units = 2 * n
    variance = units * (p_a * (1 - p_a) / n + p_b * (1 - p_b) / n)
    n_rho2 = units * rho**2
    half = np.sqrt(variance) * np.sqrt(
        2 * (n_rho2 + 1) / (units**2 * rho**2) * np.log(np.sqrt(n_rho2 + 1) / alpha)
    )
    sequential = (np.abs(p_b - p_a) > half).any(axis=1).mean()
    naive = (np.abs(p_b - p_a) > 1.959964 * np.sqrt(variance / units)).any(axis=1).mean()
    last = (np.abs(p_b - p_a)[:, -1] > half[:, -1]).mean()
    ratio = half[0, -1] / (1.959964 * math.sqrt(variance[0, -1] / units[-1]))
    print(
        f"A/A error rate 8%, {per_day} requests/day per checkpoint, {days} daily looks, "
        f"{experiments:,} experiments: ever significant {sequential:.1%} (always-valid), "
        f"{naive:.1%} (fixed-n 95% looked at daily); at the last look alone {last:.1%}; "
        f"always-valid interval {ratio:.2f}x the fixed-n width at {units[-1]:,} requests"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--experiments", type=int, default=2_000)
    args = parser.parse_args()
    time_comparisons(args.slots, args.requests)
    simulate(args.experiments)


if __name__ == "__main__":
    main()
