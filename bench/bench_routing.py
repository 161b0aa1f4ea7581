"""Routing decision in-process, warm: membership hit + pick + decrypt. Target <= 25 us/call.

Run from the repository root:  python bench/bench_routing.py
Prints two figures: the gateway's own ``Router.resolve`` (which keeps decrypted keys of
current versions in process memory) and the same decision with a real AES-GCM decryption on
every call (the worst case the target is stated for).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench_environment import (
    BENCH_PUBLIC_MODEL_ID,
    configure_environment,
    create_database,
    machine_description,
    progress,
    seed_bench_experiment,
    setup_django,
)

TARGET_US = 25.0
WARMUP_CALLS = 2_000
MEASURED_CALLS = 50_000


def median_us(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return statistics.median(ordered) / 1000, ordered[int(len(ordered) * 0.99)] / 1000


async def measure() -> dict[str, tuple[float, float]]:
    from experiments import crypto
    from experiments.models import AllocationSubject
    from gateway.routing import Router, pick_variant
    from gateway.subjects import Subject

    router = Router()
    subjects = [Subject(AllocationSubject.MACHINE.value, f"machine-{i}") for i in range(1024)]

    progress(f"warming up ({WARMUP_CALLS} calls)")
    for index in range(WARMUP_CALLS):
        subject = subjects[index % len(subjects)]
        route = await router.resolve(BENCH_PUBLIC_MODEL_ID, lambda s=subject: s)
    assert route.is_experimented, "the bench experiment did not route"

    figures: dict[str, tuple[float, float]] = {}

    progress(f"Router.resolve, warm: {MEASURED_CALLS} calls")
    samples = []
    clock = time.perf_counter_ns
    for index in range(MEASURED_CALLS):
        subject = subjects[index % len(subjects)]
        started = clock()
        await router.resolve(BENCH_PUBLIC_MODEL_ID, lambda s=subject: s)
        samples.append(clock() - started)
    figures["Router.resolve (gateway path, key cached per version)"] = median_us(samples)

    progress(f"membership hit + pick + AES-GCM decrypt: {MEASURED_CALLS} calls")
    samples = []
    for index in range(MEASURED_CALLS):
        subject = subjects[index % len(subjects)]
        started = clock()
        membership = await router.membership()
        assert BENCH_PUBLIC_MODEL_ID in membership.ids
        payload = await router.payload(BENCH_PUBLIC_MODEL_ID, membership)
        variant = pick_variant(payload["variants"], payload["experiment_id"], subject)
        crypto.decrypt_api_key(variant["encrypted_api_key"])
        samples.append(clock() - started)
    figures["membership hit + pick + decrypt every call"] = median_us(samples)

    progress(f"non-experimented id (membership miss): {MEASURED_CALLS} calls")
    from django.conf import settings

    settings.GATEWAY_DEFAULT_UPSTREAM_BASE_URL = "http://127.0.0.1:9/v1"
    samples = []
    for _ in range(MEASURED_CALLS):
        started = clock()
        await router.resolve("some/other-model", lambda: None)
        samples.append(clock() - started)
    figures["non-experimented id (default upstream)"] = median_us(samples)
    return figures


def main() -> None:
    configure_environment()
    progress("preparing the bench database (mx_bench) and Redis DB")
    create_database()
    setup_django()
    seed_bench_experiment("http://127.0.0.1:9/v1")
    figures = asyncio.run(measure())
    print()
    print(f"Routing decision, in-process, warm  ({machine_description()})")
    print(f"{'':55s} {'median':>10s} {'p99':>10s}")
    for name, (median, p99) in figures.items():
        print(f"{name:55s} {median:8.2f}us {p99:8.2f}us")
    worst = figures["membership hit + pick + decrypt every call"][0]
    verdict = "meets" if worst <= TARGET_US else "MISSES"
    print(f"target: <= {TARGET_US:.0f} us per decision (with decrypt): {verdict}")


if __name__ == "__main__":
    main()
