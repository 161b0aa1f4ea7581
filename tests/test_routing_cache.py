"""The routing caches, writer side (SPEC §7): membership and payloads in Redis.

Run against the real Redis when REDIS_URL is set (local memory otherwise).
Invalidation runs in transaction.on_commit, so each write here goes through
``committed`` to run the callbacks the test transaction would otherwise hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import timedelta

import pytest
from django.core.cache import cache, caches
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from experiments import crypto, routing_cache, selectors, services
from experiments.models import ExperimentStatus, VariantVersion
from tests.factories import VariantVersionFactory, make_experiment, upstream_config

S = ExperimentStatus
CLOSED_PORT_CACHE = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
    }
}


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run a service call and then its on_commit callbacks, as a real commit would."""

    def run(service, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return service(**kwargs)

    return run


def _membership() -> dict:
    raw = routing_cache.read_membership_raw()
    assert raw is not None, "membership was never written"
    return json.loads(raw)


def _ids() -> list[str]:
    return _membership()["ids"]


def _cached_payload(public_model_id: str) -> dict | None:
    raw = cache.get(routing_cache.payload_key(public_model_id))
    return json.loads(raw) if raw is not None else None


def _parsed_payload(public_model_id: str, generation) -> dict | None:
    raw = cache.get(routing_cache.payload_key(public_model_id))
    return routing_cache.parse_payload(raw, generation)


def _every_cached_value() -> list[bytes]:
    """Every value this test run holds in the cache, as stored."""
    if hasattr(cache, "client"):  # django-redis: read Redis itself
        redis = cache.client.get_client()
        return [redis.get(key) for key in redis.scan_iter(match=cache.make_key("*"))]
    return list(cache._cache.values())  # local memory: pickled values


# --- membership after each transition ----------------------------------------------


@pytest.mark.django_db
def test_activation_adds_the_public_id(committed):
    experiment = make_experiment()
    committed(services.activate, experiment=experiment)
    assert experiment.public_model_id in _ids()


@pytest.mark.django_db
def test_pause_keeps_the_public_id(committed):
    experiment = make_experiment(status=S.ACTIVE)
    committed(services.pause, experiment=experiment)
    assert experiment.public_model_id in _ids()


@pytest.mark.django_db
def test_resume_keeps_the_public_id(committed):
    experiment = make_experiment(status=S.PAUSED)
    committed(services.activate, experiment=experiment)
    assert experiment.public_model_id in _ids()


@pytest.mark.django_db
def test_archiving_a_paused_experiment_keeps_the_public_id(committed):
    # Archive hides from lists and changes no routing: a paused id still answers 404.
    experiment = make_experiment(status=S.PAUSED)
    committed(services.archive, experiment=experiment)
    assert experiment.public_model_id in _ids()


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.ACTIVE, S.PAUSED])
def test_completion_removes_the_public_id(committed, status):
    experiment = make_experiment(status=status)
    other = make_experiment(status=S.ACTIVE)
    committed(services.complete, experiment=experiment)
    assert _ids() == [other.public_model_id]


@pytest.mark.django_db
def test_completed_experiment_with_a_replacement_keeps_the_public_id(committed):
    first = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-x")
    second = make_experiment(public_model_id="kilo/preview-x")

    committed(services.complete, experiment=first)
    committed(services.activate, experiment=second)
    assert _ids() == ["kilo/preview-x"]

    committed(services.complete, experiment=second)
    assert _ids() == []


@pytest.mark.django_db
def test_every_routing_write_moves_the_database_generation_and_retags_membership(committed):
    experiment = make_experiment()
    variant = experiment.variants.first()
    generations = [routing_cache.read_generation()]
    for service, kwargs in [
        (services.activate, {"experiment": experiment}),
        (services.hot_swap, {"variant": variant, "upstream": upstream_config()}),
        (services.rotate_key, {"variant": variant, "api_key": "sk-rotated"}),
        (services.pause, {"experiment": experiment}),
        (services.activate, {"experiment": experiment}),
        (services.complete, {"experiment": experiment}),
    ]:
        committed(service, **kwargs)
        generation = routing_cache.read_generation()
        assert (_membership()["generation"], _membership()["token"]) == (
            generation.number,
            generation.token,
        )
        generations.append(generation)
    numbers = [generation.number for generation in generations]
    assert numbers == sorted(set(numbers))
    assert len({generation.token for generation in generations}) == len(generations)


@pytest.mark.django_db
def test_sync_all_moves_the_generation_too():
    before = routing_cache.read_generation()
    summary = routing_cache.sync_all()
    assert summary["generation"] == routing_cache.read_generation().number > before.number


@pytest.mark.django_db
def test_a_rolled_back_write_leaves_the_generation_and_the_cache_alone(committed):
    experiment = make_experiment()
    before = routing_cache.read_generation()

    def activate_then_fail(**kwargs):
        with transaction.atomic():
            services.activate(**kwargs)
            raise RuntimeError("rolled back after activation")

    with pytest.raises(RuntimeError):
        committed(activate_then_fail, experiment=experiment)
    assert routing_cache.read_generation() == before
    assert routing_cache.read_membership_raw() is None


@pytest.mark.django_db
def test_membership_written_under_an_older_generation_is_not_current(committed):
    # A write-back that lost a race with a commit, or a Redis restored from a snapshot.
    experiment = make_experiment()
    stale_generation = routing_cache.read_generation()
    committed(services.activate, experiment=experiment)
    routing_cache.write_membership([], stale_generation)

    raw = routing_cache.read_membership_raw()
    assert routing_cache.parse_membership(raw, stale_generation) == frozenset()
    assert routing_cache.parse_membership(raw, routing_cache.read_generation()) is None


# --- payloads --------------------------------------------------------------------------


@pytest.mark.django_db
def test_after_a_hot_swap_the_cached_payload_is_stale_and_the_rebuild_serves_the_new_version(
    committed,
):
    experiment = make_experiment(status=S.ACTIVE)
    variant = experiment.variants.order_by("id").first()
    routing_cache.sync_all()
    cached = routing_cache.read_generation()
    assert _parsed_payload(experiment.public_model_id, cached) is not None

    version = committed(
        services.hot_swap, variant=variant, upstream=upstream_config(internal_id="rc-2")
    )
    current = routing_cache.read_generation()
    assert _parsed_payload(experiment.public_model_id, current) is None

    routing_cache.rebuild_payload(experiment.public_model_id, current)
    slot = _parsed_payload(experiment.public_model_id, current)["variants"][0]
    assert (slot["id"], slot["version_id"]) == (str(variant.pk), str(version.pk))
    assert slot["upstream"]["internal_id"] == "rc-2"


@pytest.mark.django_db
def test_a_payload_expires_when_a_scheduled_checkpoint_takes_over():
    experiment = make_experiment(status=S.ACTIVE)
    variant = experiment.variants.order_by("id").first()
    takes_over = timezone.now() + timedelta(minutes=5)
    VariantVersionFactory(variant=variant, effective_at=takes_over)
    VariantVersionFactory(variant=variant, effective_at=takes_over + timedelta(hours=1))

    payload = routing_cache.build_payload(experiment.public_model_id)
    assert payload["valid_until"] == takes_over.timestamp()
    assert routing_cache.in_force(payload)
    after = routing_cache.build_payload(
        experiment.public_model_id, moment=takes_over + timedelta(seconds=1)
    )
    assert after["valid_until"] == (takes_over + timedelta(hours=1)).timestamp()
    assert not routing_cache.in_force({**payload, "valid_until": time.time() - 1})


@pytest.mark.django_db
def test_sync_all_rebuilds_membership_and_payloads_from_the_database():
    active = make_experiment(status=S.ACTIVE)
    paused = make_experiment(status=S.PAUSED)
    draft = make_experiment()
    completed = make_experiment(status=S.COMPLETED)
    cache.clear()  # as after a Redis flush

    summary = routing_cache.sync_all()

    assert summary["public_ids"] == 2
    assert _ids() == sorted([active.public_model_id, paused.public_model_id])
    assert _cached_payload(active.public_model_id)["status"] == S.ACTIVE
    assert _cached_payload(paused.public_model_id)["status"] == S.PAUSED
    assert _cached_payload(draft.public_model_id) is None
    assert _cached_payload(completed.public_model_id) is None


@pytest.mark.django_db
def test_public_id_change_in_draft_makes_payloads_of_both_ids_stale(committed):
    experiment = make_experiment(public_model_id="kilo/preview-old")
    generation = routing_cache.read_generation()
    stale = {"experiment_id": str(experiment.pk), "status": S.ACTIVE, "valid_until": None}
    for public_model_id in ("kilo/preview-old", "kilo/preview-new"):
        routing_cache.write_payload(public_model_id, {**stale, "variants": []}, generation)
        assert _parsed_payload(public_model_id, generation) is not None

    committed(services.update_experiment, experiment=experiment, public_model_id="kilo/preview-new")

    current = routing_cache.read_generation()
    assert current != generation
    assert _parsed_payload("kilo/preview-old", current) is None
    assert _parsed_payload("kilo/preview-new", current) is None
    assert _membership() == {"generation": current.number, "token": current.token, "ids": []}


@pytest.mark.django_db
def test_payload_lists_variants_in_id_order_with_their_current_checkpoint(canary_key):
    experiment = make_experiment(status=S.ACTIVE, weights=(3, 1, 2), api_key=canary_key)
    routing_cache.sync_all()

    payload = _cached_payload(experiment.public_model_id)

    variants = list(experiment.variants.order_by("id"))
    assert payload["experiment_id"] == str(experiment.pk)
    assert payload["status"] == S.ACTIVE
    assert [slot["id"] for slot in payload["variants"]] == [str(v.pk) for v in variants]
    for slot, variant in zip(payload["variants"], variants, strict=True):
        version = selectors.current_version(variant, with_ciphertext=True)
        assert slot["weight"] == variant.weight
        assert slot["version_id"] == str(version.pk)
        assert slot["upstream"] == version.upstream
        assert slot["encrypted_api_key"] == version.encrypted_api_key
        assert crypto.decrypt_api_key(slot["encrypted_api_key"]) == canary_key


@pytest.mark.django_db
def test_no_cached_value_holds_the_plaintext_key(committed, canary_key):
    experiment = make_experiment(api_key=canary_key)
    variant = experiment.variants.first()
    committed(services.activate, experiment=experiment)
    committed(services.rotate_key, variant=variant, api_key=canary_key)
    routing_cache.sync_all()

    values = _every_cached_value()
    assert any(b"encrypted_api_key" in value for value in values if isinstance(value, bytes))
    assert not any(canary_key.encode() in value for value in values if isinstance(value, bytes))


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.COMPLETED])
def test_draft_and_completed_experiments_have_no_payload(status):
    experiment = make_experiment(status=status)
    assert routing_cache.build_payload(experiment.public_model_id) is None


# --- Redis down ------------------------------------------------------------------------


@pytest.fixture
def redis_down():
    """A context manager that points the cache at a closed port while it is open."""

    @contextlib.contextmanager
    def outage():
        # override_settings' setting_changed handler resets django.core.cache.caches
        # on the way in and out, so `cache` follows it.
        with override_settings(CACHES=CLOSED_PORT_CACHE):
            assert caches["default"]._server == "redis://127.0.0.1:1/0"
            yield

    return outage


@pytest.mark.django_db
def test_writes_succeed_while_redis_is_down_and_the_failure_is_logged_without_a_key(
    committed, redis_down, caplog, canary_key
):
    experiment = make_experiment(api_key=canary_key)
    variant = experiment.variants.first()
    with caplog.at_level(logging.WARNING, logger="experiments.routing_cache"), redis_down():
        committed(services.activate, experiment=experiment)
        committed(services.rotate_key, variant=variant, api_key=canary_key)

    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE
    assert VariantVersion.objects.filter(variant=variant).count() == 2
    failures = [r for r in caplog.records if r.name == "experiments.routing_cache"]
    assert len(failures) == 2
    assert all("routing cache refresh failed" in r.getMessage() for r in failures)
    ciphertext = selectors.current_version(variant, with_ciphertext=True).encrypted_api_key
    assert canary_key not in caplog.text
    assert ciphertext["data"] not in caplog.text


@pytest.mark.django_db
def test_cache_heals_on_the_next_change_after_an_outage(committed, redis_down):
    missed = make_experiment()
    with redis_down():
        committed(services.activate, experiment=missed)
    assert routing_cache.read_membership_raw() is None

    later = make_experiment()
    committed(services.activate, experiment=later)

    assert _ids() == sorted([missed.public_model_id, later.public_model_id])
