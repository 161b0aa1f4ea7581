"""Routing freshness across processes and faults (SPEC §7, §13).

Every gateway here is a real uvicorn process of the test's own, behind the test database;
Redis is the shared one, none at all, or a redis-server of the test's own; a database outage
is a severed TCP proxy. The promise: within about a second of a committed routing change
every gateway process routes by it, wherever the change came from, and a stale cache never
routes a paused experiment or sends an experimented id anywhere but its experiment.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from django.db import connection
from django.urls import reverse

from experiments import routing_cache, services
from experiments.models import Experiment, Variant
from tests.conftest import requires_postgres
from tests.factories import SuperUserFactory, make_experiment, upstream_config
from tests.gateway_server import ROOT, GatewayServer, free_port, requires_server, wait_until
from tests.gateway_support import active_experiment, expected_variant_id

pytestmark = requires_postgres

#: "About one second" (GATEWAY_MEMBERSHIP_TTL_SECONDS is 1 s) plus a loaded machine's slack.
FRESH_SECONDS = 2.0
#: How long a test watches for a wrong answer that a stale cache would give: longer than the
#: 1 s after which a worker re-reads its routing state.
WATCH_SECONDS = 2.5
PARTNER_KEY = "sk-test-partner-key"
DEFAULT_KEY = "sk-default-upstream-canary-5e1b"
MACHINE = "m-freshness"

EXPERIMENT = "experiment"  # reached the upstream with the slot's checkpoint and partner key
PAUSED = "model_not_found"  # local 404, nothing sent upstream
DEFAULT = "default upstream"  # reached the upstream as a non-experimented id
UNAVAILABLE = "unavailable"  # local 503, nothing sent upstream


def routing_of(server: GatewayServer, upstream, experiment: Experiment) -> str:
    """How ``server`` routes the experiment's public id right now, checked at the upstream."""
    before = len(upstream.received)
    response = httpx.post(
        server.base_url + "/chat/completions",
        json={"model": experiment.public_model_id, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-kilocode-machineid": MACHINE},
        timeout=10,
    )
    arrived = upstream.received[before:]
    if response.status_code in (404, 503):
        assert arrived == [], "a local error must not contact the upstream"
        return {404: PAUSED, 503: UNAVAILABLE}[response.status_code]
    assert response.status_code == 200, response.text
    (request,) = arrived
    if request["headers"]["authorization"] == f"Bearer {DEFAULT_KEY}":
        return DEFAULT
    slot = Variant.objects.get(pk=expected_variant_id(experiment, "machine", MACHINE))
    assert request["json"]["model"] in {version.internal_id for version in slot.versions.all()}
    assert request["headers"]["authorization"] == f"Bearer {PARTNER_KEY}"
    return EXPERIMENT


def all_route(expected: dict[Experiment, str], servers, upstream) -> bool:
    return all(
        routing_of(server, upstream, experiment) == wanted
        for server in servers
        for experiment, wanted in expected.items()
    )


def settle(expected: dict[Experiment, str], servers, upstream) -> None:
    """Wait until every server routes every experiment as expected, within FRESH_SECONDS."""
    wait_until(lambda: all_route(expected, servers, upstream), timeout=FRESH_SECONDS)


def watch(expected: dict[Experiment, str], servers, upstream, seconds: float = WATCH_SECONDS):
    """Ask every server about every experiment for ``seconds``; return each wrong answer."""
    wrong = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for server in servers:
            for experiment, wanted in expected.items():
                got = routing_of(server, upstream, experiment)
                if got != wanted:
                    wrong.append((server.port, experiment.public_model_id, got))
    return wrong


def manage(server: GatewayServer, *args: str) -> None:
    """Run ``manage.py`` in its own process, with the environment of ``server``."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def database_url_via(port: int) -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@127.0.0.1:{port}/{db['NAME']}"


# --- without Redis (the embedded default) ---------------------------------------------------


def test_without_redis_a_pause_by_command_reaches_every_gateway_process(gateway_process, upstream):
    gateways = [gateway_process(REDIS_URL="") for _ in range(2)]
    experiment = active_experiment(upstream)
    settle({experiment: EXPERIMENT}, gateways, upstream)

    manage(gateways[0], "experiment", "pause", str(experiment.pk))
    settle({experiment: PAUSED}, gateways, upstream)

    manage(gateways[0], "experiment", "activate", str(experiment.pk))
    settle({experiment: EXPERIMENT}, gateways, upstream)


# --- Redis that loses or rewinds its data ---------------------------------------------------


def _restart_from_snapshot(redis_server, snapshot) -> None:
    redis_server.restart_from(snapshot)


def _flush(redis_server, snapshot) -> None:
    redis_server.flushall()


@pytest.mark.parametrize("fault", [_restart_from_snapshot, _flush], ids=["old snapshot", "flush"])
def test_redis_that_lost_or_rewound_its_data_never_routes_by_it(
    fault: Callable, redis_server, gateway_process, upstream, settings
):
    # The test process writes the routing cache into the test's own redis-server too.
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": redis_server.url,
            "KEY_PREFIX": "mx",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        }
    }
    environment = {
        "REDIS_URL": redis_server.url,
        "CACHE_KEY_PREFIX": "mx",
        "GATEWAY_DEFAULT_UPSTREAM_BASE_URL": upstream.base_url,
        "GATEWAY_DEFAULT_UPSTREAM_API_KEY": DEFAULT_KEY,
    }
    resumed = services.pause(experiment=active_experiment(upstream))
    activated = make_experiment(base_url=upstream.base_url, api_key=PARTNER_KEY)
    paused = active_experiment(upstream)
    running = gateway_process(**environment)
    before = {resumed: PAUSED, activated: DEFAULT, paused: EXPERIMENT}
    settle(before, [running], upstream)
    snapshot = redis_server.save()

    services.activate(experiment=resumed)
    services.activate(experiment=activated)
    services.pause(experiment=paused)
    after = {resumed: EXPERIMENT, activated: EXPERIMENT, paused: PAUSED}
    settle(after, [running], upstream)

    fault(redis_server, snapshot)
    # A worker starting now finds only what Redis holds; asked first, so that no other
    # process has rewritten Redis from the database in the meantime.
    started_after_the_fault = gateway_process(**environment)
    assert watch(after, [started_after_the_fault], upstream) == []
    assert watch(after, [running, started_after_the_fault], upstream) == []


# --- several gateway processes with Redis ---------------------------------------------------


@requires_server
def test_changes_from_the_admin_a_command_and_a_service_reach_both_gateway_processes(
    gateway_process, upstream, client
):
    gateways = [gateway_process() for _ in range(2)]
    experiment = active_experiment(upstream)
    settle({experiment: EXPERIMENT}, gateways, upstream)

    client.force_login(SuperUserFactory(username="freshness-admin"))
    response = client.post(
        reverse("admin:experiments_experiment_changelist"),
        {"action": "pause", "_selected_action": [str(experiment.pk)]},
    )
    assert response.status_code == 302
    settle({experiment: PAUSED}, gateways, upstream)

    manage(gateways[1], "experiment", "activate", str(experiment.pk))
    settle({experiment: EXPERIMENT}, gateways, upstream)

    slot = Variant.objects.get(pk=expected_variant_id(experiment, "machine", MACHINE))
    services.hot_swap(variant=slot, upstream=upstream_config("swapped-rc", upstream.base_url))

    def both_serve_the_new_checkpoint() -> bool:
        for server in gateways:
            assert routing_of(server, upstream, experiment) == EXPERIMENT
            if upstream.received[-1]["json"]["model"] != "swapped-rc":
                return False
        return True

    wait_until(both_serve_the_new_checkpoint, timeout=FRESH_SECONDS)


# --- database outage --------------------------------------------------------------------------


def _unreachable_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("redis", ["shared", "down"])
def test_during_a_database_outage_the_last_verified_routing_keeps_serving(
    redis, tcp_proxy, gateway_process, upstream
):
    database = tcp_proxy("127.0.0.1", connection.settings_dict["PORT"] or 5432)
    overrides = {"DATABASE_URL": database_url_via(database.port)}
    if redis == "down":
        overrides["REDIS_URL"] = _unreachable_redis()
    gateway = gateway_process(**overrides)
    serving = active_experiment(upstream)
    paused = services.pause(experiment=active_experiment(upstream))
    expected = {serving: EXPERIMENT, paused: PAUSED}
    settle(expected, [gateway], upstream)

    database.cut()
    assert watch(expected, [gateway], upstream) == []
    database.restore()


def test_a_gateway_that_never_reached_the_database_fails_closed(
    tcp_proxy, gateway_process, upstream
):
    experiment = active_experiment(upstream)
    routing_cache.sync_all()  # Redis holds the routing, as another worker would have left it
    database = tcp_proxy("127.0.0.1", connection.settings_dict["PORT"] or 5432)
    database.cut()
    gateway = gateway_process(
        DATABASE_URL=database_url_via(database.port),
        GATEWAY_DEFAULT_UPSTREAM_BASE_URL=upstream.base_url,
        GATEWAY_DEFAULT_UPSTREAM_API_KEY=DEFAULT_KEY,
    )
    assert routing_of(gateway, upstream, experiment) == UNAVAILABLE
    database.restore()
    settle({experiment: EXPERIMENT}, [gateway], upstream)


def test_a_database_outage_longer_than_the_grace_fails_closed_until_it_ends(
    tcp_proxy, gateway_process, upstream
):
    database = tcp_proxy("127.0.0.1", connection.settings_dict["PORT"] or 5432)
    gateway = gateway_process(
        DATABASE_URL=database_url_via(database.port),
        GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS="2",
        GATEWAY_DEFAULT_UPSTREAM_BASE_URL=upstream.base_url,
        GATEWAY_DEFAULT_UPSTREAM_API_KEY=DEFAULT_KEY,
    )
    experiment = active_experiment(upstream)
    settle({experiment: EXPERIMENT}, [gateway], upstream)

    database.cut()
    # The grace runs from the last time the database confirmed the routing, which is at most
    # one refresh interval (1 s) before the cut.
    assert watch({experiment: EXPERIMENT}, [gateway], upstream, seconds=0.8) == []
    wait_until(lambda: routing_of(gateway, upstream, experiment) == UNAVAILABLE, timeout=4)
    database.restore()
    settle({experiment: EXPERIMENT}, [gateway], upstream)
