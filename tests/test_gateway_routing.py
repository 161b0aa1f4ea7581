"""The routing reader in-process: membership and payload copies, fallbacks, fail-closed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from experiments import routing_cache, services
from experiments.models import ExperimentStatus, Variant
from gateway.errors import GatewayError
from gateway.routing import Router, RoutingStore, routing_database
from gateway.subjects import Subject
from tests.factories import VariantVersionFactory, make_experiment, upstream_config
from tests.gateway_server import wait_until
from tests.gateway_support import expected_variant_id

MACHINE = Subject("machine", "m-1")


class CountingStore(RoutingStore):
    """The real store, counting reads; ``broken`` simulates Redis being down."""

    def __init__(self, broken: bool = False):
        super().__init__()
        self.reads = 0
        self.broken = broken

    async def get(self, key):
        self.reads += 1
        if self.broken:
            raise ConnectionError("redis down")
        return await super().get(key)


def _resolve(router, model, subject=MACHINE):
    return asyncio.run(router.resolve(model, lambda: subject))


@pytest.fixture
def active(transactional_db):
    exp = make_experiment(status=ExperimentStatus.DRAFT)
    services.activate(experiment=exp)
    return exp


def test_experimented_id_routes_to_a_variant_with_decrypted_key(active):
    route = _resolve(Router(), active.public_model_id)
    assert route.is_experimented and route.api_key == "sk-test-partner-key"
    assert route.subject_kind == "machine"


def test_non_experimented_id_makes_no_cache_round_trip_in_steady_state(active, settings):
    settings.GATEWAY_MEMBERSHIP_TTL_SECONDS = 3600
    store = CountingStore()
    router = Router(store)
    with pytest.raises(GatewayError):
        _resolve(router, "kilo/not-experimented")
    reads = store.reads
    for _ in range(5):
        with pytest.raises(GatewayError) as caught:
            _resolve(router, "kilo/not-experimented")
        assert caught.value.code == "model_not_found"
    assert store.reads == reads


def test_membership_miss_is_rebuilt_from_database_and_written_back(active):
    from django.core.cache import cache

    cache.delete(routing_cache.MEMBERSHIP_KEY)
    route = _resolve(Router(), active.public_model_id)
    assert route.is_experimented
    assert active.public_model_id in routing_cache.read_membership_raw()


def test_corrupt_membership_is_rebuilt_from_database(active):
    from django.core.cache import cache

    cache.set(routing_cache.MEMBERSHIP_KEY, "{not json", timeout=None)
    assert _resolve(Router(), active.public_model_id).is_experimented


def test_cache_error_falls_back_to_database(active):
    route = _resolve(Router(CountingStore(broken=True)), active.public_model_id)
    assert route.is_experimented


def test_cache_and_database_both_down_fail_closed(active, monkeypatch):
    def database_down(*args, **kwargs):
        raise ConnectionError("db down")

    monkeypatch.setattr(routing_cache, "build_membership", database_down)
    with pytest.raises(GatewayError) as caught:
        _resolve(Router(CountingStore(broken=True)), active.public_model_id)
    assert caught.value.status == 503


def test_paused_experiment_is_404(active):
    services.pause(experiment=active)
    with pytest.raises(GatewayError) as caught:
        _resolve(Router(), active.public_model_id)
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")


def test_draft_and_completed_experiments_are_invisible(transactional_db):
    draft = make_experiment(status=ExperimentStatus.DRAFT)
    with pytest.raises(GatewayError) as caught:
        _resolve(Router(), draft.public_model_id)
    assert caught.value.code == "model_not_found"


def test_no_subject_is_503(active):
    with pytest.raises(GatewayError) as caught:
        _resolve(Router(), active.public_model_id, subject=None)
    assert (caught.value.status, caught.value.error_kind) == (503, "no_subject")


def test_missing_encryption_key_is_503(active, settings):
    settings.BYOK_ENCRYPTION_KEY = ""
    with pytest.raises(GatewayError) as caught:
        _resolve(Router(), active.public_model_id)
    assert (caught.value.status, caught.value.error_kind) == (503, "encryption_key_unavailable")


def test_undecryptable_key_is_503(active, settings):
    settings.BYOK_ENCRYPTION_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    with pytest.raises(GatewayError) as caught:
        _resolve(Router(), active.public_model_id)
    assert (caught.value.status, caught.value.error_kind) == (503, "key_undecryptable")


def test_default_upstream_serves_non_experimented_ids(transactional_db, settings):
    settings.GATEWAY_DEFAULT_UPSTREAM_BASE_URL = "http://127.0.0.1:9/v1/"
    route = _resolve(Router(), "partner/plain")
    assert not route.is_experimented and route.internal_id is None
    assert route.base_url == "http://127.0.0.1:9/v1"


def test_payload_in_cache_never_holds_a_plaintext_key(active, canary_key):
    from django.core.cache import cache

    exp = make_experiment(status=ExperimentStatus.DRAFT, api_key=canary_key)
    services.activate(experiment=exp)
    assert _resolve(Router(), exp.public_model_id).api_key == canary_key
    assert canary_key not in str(cache.get(routing_cache.payload_key(exp.public_model_id)))


def test_stale_payload_written_back_after_an_invalidation_is_not_routed_by(active):
    """A worker that rebuilt from the old state and writes back late cannot pin it."""
    generation = routing_cache.read_generation()
    stale = routing_cache.build_payload(active.public_model_id)  # read before the swap
    variant = active.variants.order_by("id").first()
    swapped = services.hot_swap(
        variant=variant, upstream={"internal_id": "rc-new", "base_url": "http://127.0.0.1:9/v1"}
    )  # commits: the generation moves on
    routing_cache.write_payload(active.public_model_id, stale, generation)

    router = Router()
    membership = asyncio.run(router.membership())
    payload = asyncio.run(router.payload(active.public_model_id, membership))
    served = {slot["id"]: slot["version_id"] for slot in payload["variants"]}
    assert served[str(variant.pk)] == str(swapped.pk)


def test_membership_of_an_older_generation_in_the_cache_is_not_routed_by(active):
    """As after Redis comes back from a snapshot taken before the activation."""
    older = routing_cache.Generation(routing_cache.read_generation().number - 1, "old-token")
    routing_cache.write_membership([], older)
    assert _resolve(Router(), active.public_model_id).is_experimented


def test_a_scheduled_checkpoint_takes_over_at_its_effective_at_without_a_commit(active):
    slot = Variant.objects.get(pk=expected_variant_id(active, MACHINE.kind, MACHINE.value))
    takes_over = timezone.now() + timedelta(seconds=1)
    VariantVersionFactory(
        variant=slot, effective_at=takes_over, upstream=upstream_config("scheduled-rc")
    )
    router = Router()
    assert _resolve(router, active.public_model_id).internal_id != "scheduled-rc"

    wait_until(
        lambda: _resolve(router, active.public_model_id).internal_id == "scheduled-rc", timeout=3
    )
    assert timezone.now() >= takes_over


class CountingDatabase:
    """The process's routing database thread, recording which reads it was asked for."""

    def __init__(self):
        self.calls: list[str] = []

    async def run(self, function, *args):
        self.calls.append(function.__name__)
        return await routing_database.run(function, *args)


def test_in_steady_state_a_worker_only_confirms_the_generation_once_per_interval(active, settings):
    settings.GATEWAY_MEMBERSHIP_TTL_SECONDS = 0.4
    store, database = CountingStore(), CountingDatabase()
    router = Router(store, database)
    _resolve(router, active.public_model_id)
    cache_reads, database_calls = store.reads, len(database.calls)

    async def traffic(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await router.resolve(active.public_model_id, lambda: MACHINE)
            with contextlib.suppress(GatewayError):  # 404: no default upstream here
                await router.resolve("kilo/not-experimented", lambda: MACHINE)
            await asyncio.sleep(0.005)

    asyncio.run(traffic(1.2))
    confirmations = database.calls[database_calls:]
    assert store.reads == cache_reads
    assert set(confirmations) == {"read_generation"}
    # Confirmed ahead of time, at half the interval: 2–3 reads in 1.2 s, never one a request.
    assert 2 <= len(confirmations) <= 1.2 / 0.2 + 1
