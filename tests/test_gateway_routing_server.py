"""Routing as observed through a running gateway: determinism, admin changes, outages, auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import redis
from django.conf import settings
from django.urls import reverse

from experiments import services
from experiments.models import ExperimentRequest, Variant
from gateway.models import GatewayUsage
from gateway.tokens import create_token, revoke_token
from tests.factories import SuperUserFactory, UserFactory, upstream_config
from tests.gateway_server import (
    ROOT,
    free_port,
    requires_server,
    wait_for_rows,
    wait_until,
)
from tests.gateway_support import (
    active_experiment,
    expected_variant_id,
    internal_id_of,
    listed_models,
    wait_listed,
)

pytestmark = requires_server

CHAT = [{"role": "user", "content": "hello"}]


def _ask(server, model, headers=None, **extra):
    return httpx.post(
        server.base_url + "/chat/completions",
        json={"model": model, "messages": CHAT, **extra},
        headers=headers or {},
        timeout=10,
    )


def _served_model(upstream, server, model, headers=None) -> str:
    response = _ask(server, model, headers)
    assert response.status_code == 200, response.text
    return upstream.received[-1]["json"]["model"]


def test_users_machines_and_ips_land_on_the_spec_formula_slot(
    gateway_factory, transactional_db, upstream
):
    proxied = gateway_factory(GATEWAY_TRUSTED_PROXIES="1")
    exp = active_experiment(upstream, weights=(1, 2, 1))
    wait_listed(proxied, exp.public_model_id)
    cases = []
    for index in range(4):
        user = UserFactory(username=f"det-user-{index}")
        _, token = create_token(username=user.username)
        cases.append(("user", str(user.pk), {"authorization": f"Bearer {token}"}))
    for index in range(6):
        machine = f"machine-{index}-abc"
        cases.append(("machine", machine, {"x-kilocode-machineid": machine}))
    for index in range(6):
        ip = f"203.0.113.{index + 7}"
        cases.append(("ip", ip, {"x-forwarded-for": f"10.9.9.9, {ip}"}))
    for kind, value, headers in cases:
        expected = internal_id_of(expected_variant_id(exp, kind, value))
        assert _served_model(upstream, proxied, exp.public_model_id, headers) == expected
        # Same subject, same slot, every time.
        assert _served_model(upstream, proxied, exp.public_model_id, headers) == expected
    wait_for_rows(len(cases) * 2, len(cases) * 2)
    subjects = set(ExperimentRequest.objects.values_list("allocation_subject", flat=True))
    assert subjects == {"user", "machine", "ip"}


def test_admin_changes_reach_the_running_server(gateway, upstream):
    exp = active_experiment(upstream)
    machine = {"x-kilocode-machineid": "m-admin-changes"}
    wait_listed(gateway, exp.public_model_id)
    slot = expected_variant_id(exp, "machine", "m-admin-changes")
    before = _served_model(upstream, gateway, exp.public_model_id, machine)
    assert before == internal_id_of(slot)

    services.pause(experiment=exp)
    wait_until(lambda: _ask(gateway, exp.public_model_id, machine).status_code == 404, timeout=3)
    upstream.clear()
    paused = _ask(gateway, exp.public_model_id, machine)
    assert paused.json()["error"]["code"] == "model_not_found"
    assert upstream.received == []
    assert exp.public_model_id not in listed_models(gateway)

    services.activate(experiment=exp)
    wait_until(lambda: _ask(gateway, exp.public_model_id, machine).status_code == 200, timeout=3)
    assert _served_model(upstream, gateway, exp.public_model_id, machine) == before

    variant = Variant.objects.get(pk=slot)
    services.hot_swap(variant=variant, upstream=upstream_config("swapped-rc", upstream.base_url))
    wait_until(
        lambda: _served_model(upstream, gateway, exp.public_model_id, machine) == "swapped-rc",
        timeout=3,
    )


def test_changes_made_in_the_admin_pages_reach_the_running_server(gateway, upstream, client):
    """The same round trip as above, but as staff do it: admin action and hot-swap page."""
    exp = active_experiment(upstream)
    machine = {"x-kilocode-machineid": "m-admin-pages"}
    wait_listed(gateway, exp.public_model_id)
    slot = expected_variant_id(exp, "machine", "m-admin-pages")
    client.force_login(SuperUserFactory(username="admin-pages"))
    changelist = reverse("admin:experiments_experiment_changelist")

    def run_action(action: str) -> None:
        response = client.post(changelist, {"action": action, "_selected_action": [str(exp.pk)]})
        assert response.status_code == 302

    run_action("pause")
    wait_until(lambda: _ask(gateway, exp.public_model_id, machine).status_code == 404, timeout=3)

    run_action("activate")
    wait_until(lambda: _ask(gateway, exp.public_model_id, machine).status_code == 200, timeout=3)

    hot_swap = reverse("admin:experiments_experiment_hot_swap", args=[exp.pk, slot])
    swapped = upstream_config("clicked-rc", upstream.base_url)
    response = client.post(hot_swap, {"upstream": json.dumps(swapped), "api_key": ""})
    assert response.status_code == 302
    wait_until(
        lambda: _served_model(upstream, gateway, exp.public_model_id, machine) == "clicked-rc",
        timeout=3,
    )


def test_label_edits_never_rebucket(gateway, upstream):
    exp = active_experiment(upstream, weights=(1, 1, 1))
    wait_listed(gateway, exp.public_model_id)
    headers = [{"x-kilocode-machineid": f"label-{i}"} for i in range(8)]
    before = [_served_model(upstream, gateway, exp.public_model_id, h) for h in headers]
    for variant in exp.variants.all():
        services.rename_variant(variant=variant, label=f"renamed-{variant.label}")
    # Nothing to observe from outside: let every worker's membership copy expire (TTL 1 s).
    time.sleep(1.5)
    after = [_served_model(upstream, gateway, exp.public_model_id, h) for h in headers]
    assert after == before


def test_hot_swap_under_traffic_keeps_slot_and_switches_version(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    machine = {"x-kilocode-machineid": "m-hot-swap"}
    slot = Variant.objects.get(pk=expected_variant_id(exp, "machine", "m-hot-swap"))
    old_version = services.current_version(slot)
    for _ in range(5):
        _served_model(upstream, gateway, exp.public_model_id, machine)
    new_version = services.hot_swap(
        variant=slot, upstream=upstream_config("hot-rc-2", upstream.base_url)
    )
    wait_until(
        lambda: _served_model(upstream, gateway, exp.public_model_id, machine) == "hot-rc-2",
        timeout=3,
    )
    for _ in range(5):
        assert _served_model(upstream, gateway, exp.public_model_id, machine) == "hot-rc-2"
    served = len(upstream.received)  # every request above reached the upstream
    wait_for_rows(served, served)
    rows = list(ExperimentRequest.objects.order_by("created_at"))
    versions = [row.variant_version_id for row in rows]
    assert {v for v in versions} <= {old_version.pk, new_version.pk}
    switch = versions.index(new_version.pk)
    assert versions[:5] == [old_version.pk] * 5
    assert set(versions[switch:]) == {new_version.pk}
    assert versions[-5:] == [new_version.pk] * 5


def test_redis_down_still_routes_experimented_ids_from_postgresql(
    gateway_factory, transactional_db, upstream
):
    no_redis = gateway_factory(REDIS_URL=f"redis://127.0.0.1:{free_port()}/5")
    exp = active_experiment(upstream)
    wait_listed(no_redis, exp.public_model_id)
    for index in range(5):
        machine = f"m-redis-down-{index}"
        expected = internal_id_of(expected_variant_id(exp, "machine", machine))
        served = _served_model(
            upstream, no_redis, exp.public_model_id, {"x-kilocode-machineid": machine}
        )
        assert served == expected
    assert httpx.get(no_redis.base + "/readyz", timeout=5).status_code == 503
    # Rows still being written when the test's tables are flushed deadlock the flush.
    wait_for_rows(5, 5)


def test_database_and_redis_down_fail_closed_with_503(gateway_factory, transactional_db, upstream):
    dead = gateway_factory(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/5",
        DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/nowhere",
        GATEWAY_DEFAULT_UPSTREAM_BASE_URL=upstream.base_url,
    )
    response = _ask(dead, "kilo/anything")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert upstream.received == []  # never routed as unexperimented
    assert httpx.get(dead.base + "/readyz", timeout=5).status_code == 503
    assert httpx.get(dead.base + "/healthz", timeout=5).status_code == 200


def test_default_upstream_serves_unexperimented_ids(gateway_factory, transactional_db, upstream):
    with_default = gateway_factory(GATEWAY_DEFAULT_UPSTREAM_BASE_URL=upstream.base_url)
    response = _ask(with_default, "partner/plain-model")
    assert response.status_code == 200
    assert upstream.received[-1]["json"]["model"] == "partner/plain-model"
    assert upstream.host_port not in response.text
    wait_for_rows(1, 0)
    assert "demo-model-rc1" in listed_models(with_default)


def test_unexperimented_id_without_default_upstream_is_404_with_usage_row(gateway):
    response = _ask(gateway, "kilo/unknown")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    wait_for_rows(1, 0)


def test_wrong_token_is_401(gateway):
    response = _ask(gateway, "kilo/x", {"authorization": "Bearer mxg_not-a-real-token"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert GatewayUsage.objects.count() == 0


def test_token_works_via_x_api_key_and_stops_after_revoke(
    gateway_factory, transactional_db, upstream
):
    no_token_cache = gateway_factory(
        GATEWAY_TOKEN_CACHE_TTL_SECONDS="0", GATEWAY_DEFAULT_UPSTREAM_BASE_URL=upstream.base_url
    )
    UserFactory(username="bob")
    row, token = create_token(username="bob")
    assert _ask(no_token_cache, "p/m", {"x-api-key": token}).status_code == 200
    revoke_token(id_or_prefix=row.token_prefix)
    assert _ask(no_token_cache, "p/m", {"x-api-key": token}).status_code == 401


def test_anonymous_access_can_be_switched_off(gateway_factory, transactional_db):
    closed = gateway_factory(GATEWAY_ALLOW_ANONYMOUS="false")
    response = _ask(closed, "kilo/x")
    assert response.status_code == 401


def test_client_request_id_is_stored(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    _ask(gateway, exp.public_model_id, {"x-kilo-request": "req-42"})
    wait_for_rows(1, 1)
    assert ExperimentRequest.objects.get().client_request_id == "req-42"


def test_canary_key_never_leaves_the_gateway(gateway, upstream, canary_key, tmp_path):
    exp = active_experiment(upstream, api_key=canary_key)
    wait_listed(gateway, exp.public_model_id)
    UserFactory(username="carol")
    _, token = create_token(username="carol")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=token, max_retries=0)
    texts = [
        client.chat.completions.with_raw_response.create(
            model=exp.public_model_id, messages=CHAT
        ).http_response.text
    ]
    for extra in (
        {"stream": True},
        {"demo_fault": "http_500"},
        {"demo_fault": "malformed_json"},
        {"stream": True, "demo_fault": "cut_stream"},
    ):
        response = _ask(gateway, exp.public_model_id, **extra)
        texts.append(response.text + str(response.headers))
    assert upstream.received[-1]["headers"]["authorization"] == f"Bearer {canary_key}"
    wait_for_rows(5, 5)
    for text in texts:
        assert canary_key not in text
    assert canary_key not in gateway.log()
    raw_redis = redis.Redis.from_url(settings.REDIS_URL)
    for key in raw_redis.scan_iter():
        assert canary_key.encode() not in (raw_redis.get(key) or b"")
    prompt_dir = gateway.log_path.parent / "prompts"
    blobs = [p for p in prompt_dir.rglob("*") if p.is_file()]
    assert blobs
    for blob in blobs:
        assert canary_key.encode() not in blob.read_bytes()


def test_models_lists_active_ids_and_healthz_readyz_answer(gateway, upstream):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    assert httpx.get(gateway.base + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = httpx.get(gateway.base + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_admin_static_files_are_served_under_uvicorn(gateway_factory, transactional_db, tmp_path):
    static_root = tmp_path / "static"
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
        cwd=ROOT,
        env={**os.environ, "STATIC_ROOT": str(static_root)},
        check=True,
    )
    server = gateway_factory(STATIC_ROOT=str(static_root))
    response = httpx.get(server.base + "/static/admin/css/base.css", timeout=5)
    assert response.status_code == 200
    assert "text/css" in response.headers["content-type"]
