"""factory-boy factories: build "an active experiment with two variants" in one line."""

from __future__ import annotations

import hashlib

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from experiments import crypto
from experiments.models import (
    AllocationSubject,
    Experiment,
    ExperimentRequest,
    ExperimentStatus,
    RequestKind,
    Variant,
    VariantVersion,
)
from gateway.models import GatewayUsage


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pw-for-tests-1234")


class StaffUserFactory(UserFactory):
    is_staff = True


class SuperUserFactory(UserFactory):
    is_staff = True
    is_superuser = True


class ExperimentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Experiment

    public_model_id = factory.Sequence(lambda n: f"kilo/preview-{n}")
    name = factory.Sequence(lambda n: f"Experiment {n}")
    status = ExperimentStatus.DRAFT


class VariantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Variant

    experiment = factory.SubFactory(ExperimentFactory)
    label = factory.Sequence(lambda n: f"variant-{n}")
    weight = 1


def upstream_config(
    internal_id: str = "partner-model-rc1", base_url: str = "http://127.0.0.1:9/v1", **extra
):
    return {"internal_id": internal_id, "base_url": base_url, **extra}


class VariantVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = VariantVersion

    class Params:
        api_key = "sk-test-partner-key"

    variant = factory.SubFactory(VariantFactory)
    upstream = factory.Sequence(lambda n: upstream_config(internal_id=f"partner-model-rc{n}"))
    encrypted_api_key = factory.LazyAttribute(lambda o: crypto.encrypt_api_key(o.api_key))
    key_fingerprint = factory.LazyFunction(crypto.key_fingerprint)
    effective_at = factory.LazyFunction(timezone.now)


def make_experiment(
    *,
    status: str = ExperimentStatus.DRAFT,
    weights: tuple[int, ...] = (1, 1),
    base_url: str = "http://127.0.0.1:9/v1",
    api_key: str = "sk-test-partner-key",
    **fields,
) -> Experiment:
    """An experiment with one variant per weight, each holding one checkpoint."""
    started = timezone.now() if status != ExperimentStatus.DRAFT else None
    experiment = ExperimentFactory(status=status, started_at=started, **fields)
    for index, weight in enumerate(weights):
        variant = VariantFactory(
            experiment=experiment, label=f"slot-{chr(ord('a') + index)}", weight=weight
        )
        VariantVersionFactory(
            variant=variant,
            upstream=upstream_config(
                internal_id=f"secret-rc-{index}-{experiment.pk.hex[:6]}", base_url=base_url
            ),
            api_key=api_key,
        )
    return experiment


class GatewayUsageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = GatewayUsage

    created_at = factory.LazyFunction(timezone.now)
    public_model_id = "kilo/preview-foo"
    request_kind = RequestKind.CHAT_COMPLETIONS
    is_stream = False
    status_code = 200
    has_error = False
    input_tokens = 10
    output_tokens = 20
    ttfb_ms = 100
    total_ms = 200


class ExperimentRequestFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ExperimentRequest

    usage = factory.SubFactory(GatewayUsageFactory)
    variant_version = factory.SubFactory(VariantVersionFactory)
    allocation_subject = AllocationSubject.USER
    client_request_id = factory.Sequence(lambda n: f"req-{n}")
    request_kind = RequestKind.CHAT_COMPLETIONS
    request_body_sha256 = factory.Sequence(lambda n: hashlib.sha256(str(n).encode()).hexdigest())
    was_truncated = False
    created_at = factory.LazyAttribute(lambda o: o.usage.created_at)
    # The gateway writer copies the usage row's measures (USAGE_MEASURES).
    status_code = factory.LazyAttribute(lambda o: o.usage.status_code)
    has_error = factory.LazyAttribute(lambda o: o.usage.has_error)
    is_stream = factory.LazyAttribute(lambda o: o.usage.is_stream)
    input_tokens = factory.LazyAttribute(lambda o: o.usage.input_tokens)
    output_tokens = factory.LazyAttribute(lambda o: o.usage.output_tokens)
    ttfb_ms = factory.LazyAttribute(lambda o: o.usage.ttfb_ms)
    total_ms = factory.LazyAttribute(lambda o: o.usage.total_ms)
