"""Checkpoints: hot-swap, key rotation, immutability and the current version (SPEC §2, §3)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from experiments import crypto, routing_cache, services
from experiments.models import ExperimentStatus, ImmutableVersionError, VariantVersion
from tests.factories import (
    StaffUserFactory,
    VariantFactory,
    VariantVersionFactory,
    make_experiment,
    upstream_config,
)

S = ExperimentStatus
LOW_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
HIGH_ID = uuid.UUID("ffffffff-ffff-4fff-bfff-fffffffffffe")


def _first_variant(status: str = S.DRAFT):
    return make_experiment(status=status).variants.order_by("id").first()


def _ciphertext(version: VariantVersion) -> dict:
    return VariantVersion.with_ciphertext.get(pk=version.pk).encrypted_api_key


# --- hot-swap ------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED])
def test_hot_swap_with_key_makes_a_new_current_version(status, canary_key):
    variant = _first_variant(status)
    version = services.hot_swap(
        variant=variant, upstream=upstream_config(internal_id="rc-2"), api_key=canary_key
    )
    assert services.current_version(variant).pk == version.pk
    assert version.upstream["internal_id"] == "rc-2"
    assert crypto.decrypt_api_key(_ciphertext(version)) == canary_key


@pytest.mark.django_db
def test_hot_swap_without_key_reuses_the_previous_ciphertext():
    variant = _first_variant(S.ACTIVE)
    previous = services.current_version(variant, with_ciphertext=True)
    version = services.hot_swap(variant=variant, upstream=upstream_config(internal_id="rc-2"))
    assert _ciphertext(version) == previous.encrypted_api_key
    assert services.current_version(variant).pk == version.pk


@pytest.mark.django_db
def test_hot_swap_with_a_blank_key_counts_as_no_key():
    variant = _first_variant()
    previous = services.current_version(variant, with_ciphertext=True)
    version = services.hot_swap(variant=variant, upstream=upstream_config(), api_key="   ")
    assert _ciphertext(version) == previous.encrypted_api_key


@pytest.mark.django_db
def test_hot_swap_into_an_empty_variant_requires_a_key():
    variant = VariantFactory()
    with pytest.raises(services.InvalidInput, match="API key is required") as invalid:
        services.hot_swap(variant=variant, upstream=upstream_config())
    assert invalid.value.field == "api_key"
    assert not VariantVersion.objects.filter(variant=variant).exists()


@pytest.mark.django_db
def test_hot_swap_into_an_empty_variant_with_a_key():
    variant = VariantFactory()
    version = services.hot_swap(variant=variant, upstream=upstream_config(), api_key="sk-new")
    assert services.current_version(variant).pk == version.pk


@pytest.mark.django_db
def test_hot_swap_after_completion_is_refused():
    variant = _first_variant(S.COMPLETED)
    with pytest.raises(services.ExperimentError, match="experiment is completed"):
        services.hot_swap(variant=variant, upstream=upstream_config(), api_key="sk-new")
    assert VariantVersion.objects.filter(variant=variant).count() == 1


@pytest.mark.django_db
def test_hot_swap_with_an_invalid_upstream_names_the_field_and_writes_nothing():
    variant = _first_variant()
    with pytest.raises(services.InvalidInput) as invalid:
        services.hot_swap(
            variant=variant, upstream={"internal_id": "rc-2", "base_url": "ftp://x", "api_key": "k"}
        )
    assert invalid.value.field == "upstream"
    assert set(invalid.value.errors) == {"base_url", "api_key"}
    assert VariantVersion.objects.filter(variant=variant).count() == 1


@pytest.mark.django_db
def test_hot_swap_refuses_a_multi_line_key_without_echoing_it():
    variant = _first_variant()
    with pytest.raises(services.InvalidInput) as invalid:
        services.hot_swap(variant=variant, upstream=upstream_config(), api_key="sk-a\nsk-b")
    assert "sk-a" not in str(invalid.value)
    assert VariantVersion.objects.filter(variant=variant).count() == 1


@pytest.mark.django_db
def test_hot_swap_stores_the_normalized_upstream():
    variant = _first_variant()
    version = services.hot_swap(
        variant=variant, upstream=upstream_config(base_url="https://partner.example/v1/")
    )
    assert version.upstream == {
        "internal_id": "partner-model-rc1",
        "base_url": "https://partner.example/v1",
    }


@pytest.mark.django_db
def test_hot_swap_records_the_acting_user():
    variant = _first_variant()
    user = StaffUserFactory()
    version = services.hot_swap(variant=variant, upstream=upstream_config(), by=user)
    assert VariantVersion.objects.get(pk=version.pk).created_by == user


# --- key rotation ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED])
def test_rotate_key_copies_the_latest_upstream_with_a_new_ciphertext(status, canary_key):
    variant = _first_variant(status)
    previous = services.current_version(variant, with_ciphertext=True)
    version = services.rotate_key(variant=variant, api_key=canary_key)
    assert version.upstream == previous.upstream
    assert _ciphertext(version) != previous.encrypted_api_key
    assert crypto.decrypt_api_key(_ciphertext(version)) == canary_key
    assert services.current_version(variant).pk == version.pk


@pytest.mark.django_db
def test_rotate_key_after_completion_is_refused():
    variant = _first_variant(S.COMPLETED)
    with pytest.raises(services.ExperimentError, match="experiment is completed"):
        services.rotate_key(variant=variant, api_key="sk-new")
    assert VariantVersion.objects.filter(variant=variant).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("api_key", [None, "", "   "])
def test_rotate_key_requires_a_key(api_key):
    variant = _first_variant()
    with pytest.raises(services.InvalidInput, match="new API key is required"):
        services.rotate_key(variant=variant, api_key=api_key)
    assert VariantVersion.objects.filter(variant=variant).count() == 1


@pytest.mark.django_db
def test_rotate_key_of_an_empty_variant_asks_for_a_hot_swap_first():
    variant = VariantFactory()
    with pytest.raises(services.InvalidInput, match="hot-swap one in first"):
        services.rotate_key(variant=variant, api_key="sk-new")
    assert not VariantVersion.objects.filter(variant=variant).exists()


# --- immutability ----------------------------------------------------------------


@pytest.mark.django_db
def test_saving_an_existing_version_is_refused():
    version = VariantVersion.with_ciphertext.get(pk=VariantVersionFactory().pk)
    version.upstream = upstream_config(internal_id="tampered")
    with pytest.raises(ImmutableVersionError):
        version.save()
    assert VariantVersion.objects.get(pk=version.pk).upstream["internal_id"] != "tampered"


@pytest.mark.django_db
def test_deleting_a_version_is_refused():
    version = VariantVersionFactory()
    with pytest.raises(ImmutableVersionError):
        version.delete()
    assert VariantVersion.objects.filter(pk=version.pk).exists()


@pytest.mark.django_db
def test_default_manager_never_loads_the_ciphertext():
    version = VariantVersionFactory()
    loaded = VariantVersion.objects.get(pk=version.pk)
    assert "encrypted_api_key" in loaded.get_deferred_fields()


# --- the current version -------------------------------------------------------


def _twin_versions(variant, effective_at, insertion_order):
    """Two versions with the same effective_at, inserted in the given order; returns the high."""
    versions = {
        pk: VariantVersionFactory.build(id=pk, variant=variant, effective_at=effective_at)
        for pk in (LOW_ID, HIGH_ID)
    }
    for pk in insertion_order:
        versions[pk].save()
    return versions[HIGH_ID]


# Both insertion orders: neither the physical row order nor "newest insert" may decide.
INSERTION_ORDERS = pytest.mark.parametrize(
    "insertion_order", [(LOW_ID, HIGH_ID), (HIGH_ID, LOW_ID)], ids=["low-first", "high-first"]
)


@pytest.mark.django_db
@INSERTION_ORDERS
def test_same_effective_at_resolves_to_the_greatest_id(insertion_order):
    variant = VariantFactory()
    high = _twin_versions(variant, timezone.now(), insertion_order)
    assert services.current_version(variant).pk == high.pk


@pytest.mark.django_db
@INSERTION_ORDERS
def test_same_effective_at_resolves_to_the_greatest_id_in_the_routing_payload(insertion_order):
    experiment = make_experiment(status=S.ACTIVE)
    variant = experiment.variants.order_by("id").first()
    high = _twin_versions(variant, timezone.now(), insertion_order)
    payload = routing_cache.build_payload(experiment.public_model_id)
    slot = next(v for v in payload["variants"] if v["id"] == str(variant.pk))
    assert slot["version_id"] == str(high.pk)


@pytest.mark.django_db
def test_a_future_version_is_not_current_yet():
    experiment = make_experiment(status=S.ACTIVE)
    variant = experiment.variants.order_by("id").first()
    in_force = services.current_version(variant)
    future = VariantVersionFactory(
        variant=variant, effective_at=timezone.now() + timedelta(hours=1)
    )

    assert services.current_version(variant).pk == in_force.pk
    payload = routing_cache.build_payload(experiment.public_model_id)
    slot = next(v for v in payload["variants"] if v["id"] == str(variant.pk))
    assert slot["version_id"] == str(in_force.pk)
    later = timezone.now() + timedelta(hours=2)
    assert services.current_version(variant, moment=later).pk == future.pk


@pytest.mark.django_db
def test_each_hot_swap_in_quick_succession_becomes_current():
    variant = _first_variant(S.ACTIVE)
    for index in range(5):
        version = services.hot_swap(
            variant=variant, upstream=upstream_config(internal_id=f"rc-{index}")
        )
        assert services.current_version(variant).pk == version.pk
