"""Builders shared by the gateway tests: experiments on the demo upstream, the SPEC §7 formula."""

from __future__ import annotations

import hashlib
import uuid

import httpx

from experiments import services
from experiments.models import Experiment, ExperimentStatus, Variant
from tests.factories import make_experiment
from tests.gateway_server import GatewayServer, wait_until


def active_experiment(upstream, *, weights=(1, 1), api_key="sk-test-partner-key", **fields):
    experiment = make_experiment(
        status=ExperimentStatus.DRAFT,
        weights=weights,
        base_url=upstream.base_url,
        api_key=api_key,
        **fields,
    )
    services.activate(experiment=experiment)
    return experiment


def listed_models(gateway: GatewayServer) -> list[str]:
    response = httpx.get(gateway.base_url + "/models", timeout=5)
    return [item["id"] for item in response.json().get("data", [])]


def wait_listed(gateway: GatewayServer, public_model_id: str, *, listed: bool = True) -> None:
    wait_until(lambda: (public_model_id in listed_models(gateway)) == listed, timeout=5)


def expected_variant_id(experiment: Experiment, kind: str, value: str):
    """The slot SPEC §7 assigns, computed independently of gateway.routing."""
    variants = sorted(experiment.variants.all(), key=lambda v: uuid.UUID(str(v.pk)))
    total = sum(v.weight for v in variants)
    seed = f"model_exp_{experiment.pk}_{kind}_{value}"
    bucket = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") % total
    running = 0
    for variant in variants:
        running += variant.weight
        if running > bucket:
            return variant.pk
    raise AssertionError("unreachable")


def internal_id_of(variant_id) -> str:
    return services.current_version(Variant.objects.get(pk=variant_id)).internal_id
