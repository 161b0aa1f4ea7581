"""The gateway against a careless partner (SPEC §6, §8), end to end: a real gateway process,
a real partner on loopback that echoes the key it received, names its deployment, sets
cookies and sends oversized events. Canary keys must appear nowhere the client or the
gateway's log can show."""

from __future__ import annotations

import json

import httpx
import pytest

from experiments import services
from experiments.models import ExperimentStatus
from gateway.models import GatewayUsage
from tests.factories import ExperimentFactory, VariantFactory, VariantVersionFactory
from tests.gateway_server import GatewayServer, requires_server, wait_for_rows
from tests.gateway_support import expected_variant_id, wait_listed
from tests.hostile_upstream import COOKIE_NAME, json_escaped

pytestmark = requires_server

#: What a partner key echoed back becomes in what the client reads.
REDACTED = "[redacted]"

CHAT = [{"role": "user", "content": "hello there"}]
PATHS = {
    "/chat/completions": {"messages": CHAT},
    "/messages": {"messages": CHAT, "max_tokens": 20},
}


def hostile_experiment(checkpoints: list[tuple[str, str]], api_key: str):
    """An active experiment with one slot per ``(base_url, internal_id)``."""
    experiment = ExperimentFactory(status=ExperimentStatus.DRAFT)
    for index, (base_url, internal_id) in enumerate(checkpoints):
        variant = VariantFactory(experiment=experiment, label=f"slot-{index}", weight=1)
        VariantVersionFactory(
            variant=variant,
            upstream={"internal_id": internal_id, "base_url": base_url},
            api_key=api_key,
        )
    services.activate(experiment=experiment)
    return experiment


def one_partner_experiment(base_url: str, api_key: str):
    """Two slots (activation needs two) on the same partner deployment."""
    return hostile_experiment([(base_url, "partner-rc1"), (base_url, "partner-rc2")], api_key)


@pytest.fixture
def keyed_experiment(gateway, hostile_upstream, canary_key):
    experiment = one_partner_experiment(hostile_upstream.base_url("rc1-east"), canary_key)
    wait_listed(gateway, experiment.public_model_id)
    return experiment


def send(gateway: GatewayServer, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(gateway.base_url + path, json=body, headers=headers, timeout=15)


def everything_sent(response: httpx.Response) -> str:
    """What the client received: status line's worth, headers and body."""
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    return f"{headers}\n\n{response.content.decode('utf-8', 'replace')}"


def assert_never_shown(secret: str, gateway: GatewayServer, *responses: httpx.Response) -> None:
    for response in responses:
        assert secret not in everything_sent(response)
    assert secret not in gateway.log()


def stream_events(response: httpx.Response) -> list[dict]:
    return [
        json.loads(block.split("data: ", 1)[1])
        for block in response.text.split("\n\n")
        if "data: {" in block
    ]


def streamed_text(response: httpx.Response) -> str:
    text = []
    for event in stream_events(response):
        for choice in event.get("choices", []):
            text.append(choice["delta"].get("content") or "")
        if event.get("type") == "content_block_delta":
            text.append(event["delta"]["text"])
    return "".join(text)


# --- 1. the key the gateway sent never comes back -------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_key_echoed_in_an_error_message_param_and_headers_never_reaches_the_client(
    gateway, hostile_upstream, keyed_experiment, canary_key, path
):
    body = {**PATHS[path], "model": keyed_experiment.public_model_id, "hostile": "key_in_error"}
    response = send(gateway, path, body)
    assert hostile_upstream.received[-1]["headers"]["authorization"] == f"Bearer {canary_key}"
    assert response.status_code == 401
    assert response.json()["error"]["message"] == (
        f"Incorrect API key provided: {REDACTED}. You sent {REDACTED}."
    )
    for header in ("retry-after", "x-echo-key", "www-authenticate", "set-cookie"):
        assert header not in response.headers
    assert_never_shown(canary_key, gateway, response)
    wait_for_rows(1, 1)


def test_a_key_echoed_in_a_completion_verbatim_and_json_escaped_is_scrubbed(
    gateway, hostile_upstream, keyed_experiment, canary_key
):
    body = {**PATHS["/chat/completions"], "model": keyed_experiment.public_model_id}
    response = send(gateway, "/chat/completions", {**body, "hostile": "key_in_completion"})
    assert json_escaped(canary_key) not in hostile_upstream.received[-1]["json"]
    assert response.status_code == 200
    content = response.json()["choices"][0]["message"]["content"]
    assert content == f"verbatim {REDACTED} escaped {REDACTED}"
    assert "x-echo-key" not in response.headers
    assert_never_shown(canary_key, gateway, response)
    wait_for_rows(1, 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("piece", "seen"),
    [
        # One character a delta: "s" and "k" go out before "-" shows the key may follow
        # (holding every delta ending in "s" would delay too many); the rest is cut.
        (1, f"Your key is sk{REDACTED}."),
        (3, f"Your key is {REDACTED}."),
        (10, f"Your key is {REDACTED}."),
    ],
)
def test_a_key_split_across_stream_deltas_never_reaches_the_client(
    gateway, keyed_experiment, canary_key, path, piece, seen
):
    body = {
        **PATHS[path],
        "model": keyed_experiment.public_model_id,
        "stream": True,
        "hostile": "key_in_stream",
        "piece": piece,
    }
    response = send(gateway, path, body)
    assert response.status_code == 200
    assert streamed_text(response) == seen
    assert_never_shown(canary_key, gateway, response)
    wait_for_rows(1, 1)
    assert not GatewayUsage.objects.get().has_error


def test_the_default_upstreams_key_echoed_back_is_scrubbed(
    gateway_factory, transactional_db, hostile_upstream, canary_key
):
    server = gateway_factory(
        GATEWAY_DEFAULT_UPSTREAM_BASE_URL=hostile_upstream.base_url("default"),
        GATEWAY_DEFAULT_UPSTREAM_API_KEY=canary_key,
    )
    body = {**PATHS["/chat/completions"], "model": "partner/any-model"}
    responses = [
        send(server, "/chat/completions", {**body, "hostile": "key_in_error"}),
        send(server, "/chat/completions", {**body, "hostile": "key_in_completion"}),
        send(server, "/chat/completions", {**body, "hostile": "key_in_stream", "stream": True}),
    ]
    assert hostile_upstream.received[-1]["headers"]["authorization"] == f"Bearer {canary_key}"
    assert [r.status_code for r in responses] == [401, 200, 200]
    assert_never_shown(canary_key, server, *responses)
    wait_for_rows(3, 0)


def test_a_retry_after_in_delta_seconds_reaches_the_client(gateway, keyed_experiment):
    body = {**PATHS["/chat/completions"], "model": keyed_experiment.public_model_id}
    response = send(
        gateway, "/chat/completions", {**body, "hostile": "retry_after", "retry_after": 7}
    )
    assert (response.status_code, response.headers.get("retry-after")) == (429, "7")
    wait_for_rows(1, 1)


# --- 2. blinding that is not itself a signal --------------------------------------------


@pytest.fixture
def two_slots(gateway, hostile_upstream, second_hostile_upstream, canary_key):
    """Two slots on two partner hosts, deployments rc1-east and rc2-west."""
    experiment = hostile_experiment(
        [
            (hostile_upstream.base_url("rc1-east"), "partner-rc1"),
            (second_hostile_upstream.base_url("rc2-west"), "partner-rc2"),
        ],
        canary_key,
    )
    wait_listed(gateway, experiment.public_model_id)
    return experiment


def machine_ids_per_slot(experiment) -> list[str]:
    """One machine id that lands in each slot, slots in id order."""
    wanted = sorted(experiment.variants.values_list("pk", flat=True))
    found: dict = {}
    candidate = 0
    while len(found) < len(wanted):
        machine = f"machine-{candidate}"
        found.setdefault(expected_variant_id(experiment, "machine", machine), machine)
        candidate += 1
    return [found[variant_id] for variant_id in wanted]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_naming_both_internal_ids_and_hosts_comes_back_unchanged(
    gateway, two_slots, hostile_upstream, second_hostile_upstream, stream
):
    prompt = (
        f"Is it partner-rc1 or partner-rc2, on {hostile_upstream.host_port} or "
        f"{second_hostile_upstream.base_url('rc2-west')}?"
    )
    body = {
        "model": two_slots.public_model_id,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        "piece": 1000,  # the whole echo in one delta
    }
    responses = [
        send(gateway, "/chat/completions", body, **{"x-kilocode-machineid": machine})
        for machine in machine_ids_per_slot(two_slots)
    ]
    for response in responses:
        if stream:
            assert streamed_text(response) == f"echo: {prompt}"
            assert all(e.get("model") == two_slots.public_model_id for e in stream_events(response))
        else:
            assert response.json()["choices"][0]["message"]["content"] == f"echo: {prompt}"
            assert response.json()["model"] == two_slots.public_model_id
    assert hostile_upstream.received and second_hostile_upstream.received
    wait_for_rows(2, 2)


def test_both_slots_answer_byte_identical_errors_for_a_500_naming_their_deployment(
    gateway, two_slots, hostile_upstream, second_hostile_upstream
):
    body = {**PATHS["/chat/completions"], "model": two_slots.public_model_id}
    responses = [
        send(
            gateway,
            "/chat/completions",
            {**body, "hostile": "deployment_error"},
            **{"x-kilocode-machineid": machine},
        )
        for machine in machine_ids_per_slot(two_slots)
    ]
    assert [r.status_code for r in responses] == [500, 500]
    # Each slot's partner did name its own deployment, model and host.
    assert hostile_upstream.received and second_hostile_upstream.received
    assert responses[0].content == responses[1].content
    error = responses[0].json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["message"] == (
        f"Deployment upstream failed serving model {two_slots.public_model_id} on upstream "
        "(upstream/chat/completions)"
    )
    wait_for_rows(2, 2)


def test_an_upstream_error_keeps_only_message_type_and_code(gateway, keyed_experiment):
    body = {**PATHS["/chat/completions"], "model": keyed_experiment.public_model_id}
    response = send(gateway, "/chat/completions", {**body, "hostile": "deployment_error"})
    assert response.status_code == 500
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "code"}
    wait_for_rows(1, 1)


# --- 3. no cookie jar -------------------------------------------------------------------


def test_a_partner_cookie_is_neither_passed_to_the_client_nor_replayed_for_the_next_user(
    gateway, hostile_upstream, canary_key
):
    # A host name rather than an IP: cookie jars keep cookies of named hosts.
    base_url = hostile_upstream.base_url("rc1-east").replace("127.0.0.1", "localhost")
    experiment = one_partner_experiment(base_url, canary_key)
    wait_listed(gateway, experiment.public_model_id)
    body = {
        **PATHS["/chat/completions"],
        "model": experiment.public_model_id,
        "hostile": "set_cookie",
    }
    first = send(gateway, "/chat/completions", body, **{"x-kilocode-machineid": "user-a"})
    second = send(gateway, "/chat/completions", body, **{"x-kilocode-machineid": "user-b"})
    assert (first.status_code, second.status_code) == (200, 200)
    assert "set-cookie" not in first.headers and "set-cookie" not in second.headers
    assert [r["headers"].get("cookie") for r in hostile_upstream.received] == [None, None]
    assert COOKIE_NAME not in everything_sent(first) + everything_sent(second)
    wait_for_rows(2, 2)


# --- 13. one event's size is bounded -----------------------------------------------------


@pytest.fixture
def small_event_gateway(gateway_factory, transactional_db) -> GatewayServer:
    return gateway_factory(GATEWAY_MAX_SSE_EVENT_BYTES="65536")


def one_huge_event(gateway: GatewayServer, hostile_upstream, api_key: str, size: int, write: int):
    """A stream whose one content delta holds ``size`` bytes, sent ``write`` bytes at a time."""
    experiment = one_partner_experiment(hostile_upstream.base_url("rc1"), api_key)
    wait_listed(gateway, experiment.public_model_id)
    body = {
        **PATHS["/chat/completions"],
        "model": experiment.public_model_id,
        "stream": True,
        "hostile": "huge_event",
        "size": size,
        "write": write,
    }
    return send(gateway, "/chat/completions", body)


def test_an_event_over_the_size_limit_ends_the_stream_with_an_error_event(
    small_event_gateway, hostile_upstream, canary_key
):
    response = one_huge_event(small_event_gateway, hostile_upstream, canary_key, 200_000, 4096)
    assert response.status_code == 200
    assert len(response.content) < 65536
    last = stream_events(response)[-1]
    assert last == {
        "error": {
            "message": "The model provider returned a malformed response.",
            "type": "upstream_error",
            "code": "upstream_malformed",
        }
    }
    wait_for_rows(1, 1)
    assert GatewayUsage.objects.get().error_kind == "upstream_malformed"


def test_an_event_under_the_size_limit_is_relayed_whole(
    small_event_gateway, hostile_upstream, canary_key
):
    response = one_huge_event(small_event_gateway, hostile_upstream, canary_key, 60_000, 1000)
    assert streamed_text(response) == "x" * 60_000
    wait_for_rows(1, 1)
    assert not GatewayUsage.objects.get().has_error
