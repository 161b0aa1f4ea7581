"""PostgreSQL cut away from a running gateway (SPEC §9, issue 7 items 9–10): the requests it
answers meanwhile have their usage and attribution rows exactly once after the database
returns — also when the gateway is stopped or killed during the cut; a full spool refuses
model requests rather than losing evidence; tokens verified before the cut keep working.

The gateway reaches PostgreSQL through a TcpProxy the test cuts; the test process reads the
database directly. Redis stays up, so routing is served from its cache throughout."""

from __future__ import annotations

import httpx
import pytest

from gateway.tokens import create_token
from tests.factories import UserFactory
from tests.gateway_server import requires_server, wait_until
from tests.gateway_support import active_experiment, wait_listed
from tests.outage_support import ask, assert_rows_exactly_once, kill

pytestmark = requires_server


def ask_all(gateway, model: str, request_ids: list[str]) -> None:
    for request_id in request_ids:
        response = ask(gateway, model, request_id)
        assert response.status_code == 200, response.text


def test_requests_answered_while_the_database_is_cut_have_their_rows_exactly_once_after_it_returns(
    start_gateway, database_proxy, upstream
):
    experiment = active_experiment(upstream)
    gateway = start_gateway()
    wait_listed(gateway, experiment.public_model_id)
    before = [f"before-{index}" for index in range(5)]
    during = [f"during-{index}" for index in range(20)]
    after = [f"after-{index}" for index in range(5)]

    ask_all(gateway, experiment.public_model_id, before)
    database_proxy.cut()
    ask_all(gateway, experiment.public_model_id, during)
    database_proxy.restore()
    ask_all(gateway, experiment.public_model_id, after)

    assert_rows_exactly_once(before + during + after)


@pytest.mark.parametrize("stop", ["graceful", "sigkill"])
def test_rows_spooled_by_a_gateway_stopped_during_the_cut_land_exactly_once_through_its_successor(
    start_gateway, database_proxy, upstream, stop
):
    experiment = active_experiment(upstream)
    gateway = start_gateway()
    wait_listed(gateway, experiment.public_model_id)
    request_ids = [f"spooled-{index}" for index in range(10)]

    database_proxy.cut()
    ask_all(gateway, experiment.public_model_id, request_ids)
    if stop == "graceful":
        gateway.stop()
    else:
        kill(gateway)
    start_gateway()  # the same host's next process, started while the database is still cut
    database_proxy.restore()

    assert_rows_exactly_once(request_ids)


def readiness(gateway) -> tuple[int, dict]:
    response = httpx.get(gateway.base + "/readyz", timeout=10)
    return response.status_code, response.json()


def test_a_full_spool_refuses_model_requests_and_reports_not_ready_until_it_drains(
    start_gateway, database_proxy, upstream
):
    experiment = active_experiment(upstream)
    # Room for a handful of records.
    gateway = start_gateway(GATEWAY_SPOOL_MAX_BYTES="4096")
    wait_listed(gateway, experiment.public_model_id)
    database_proxy.cut()

    answered = []
    for index in range(100):
        response = ask(gateway, experiment.public_model_id, f"full-{index}")
        if response.status_code != 200:
            break
        answered.append(f"full-{index}")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "usage_spool_full"
    assert 0 < len(answered) < 100
    status, body = readiness(gateway)
    assert (status, body["usage_spool"]) == (503, "full")

    database_proxy.restore()
    wait_until(lambda: readiness(gateway)[0] == 200, timeout=30)
    ask_all(gateway, experiment.public_model_id, ["full-after"])
    assert_rows_exactly_once([*answered, "full-after"])


@pytest.fixture
def token():
    user = UserFactory(username="outage-user")
    return create_token(username=user.username)[1]


def test_a_token_verified_before_the_cut_keeps_working_while_the_database_is_away(
    start_gateway, database_proxy, upstream, token
):
    experiment = active_experiment(upstream)
    # A TTL of zero: every request after the first finds its verification expired.
    gateway = start_gateway(GATEWAY_TOKEN_CACHE_TTL_SECONDS="0")
    wait_listed(gateway, experiment.public_model_id)
    bearer = {"authorization": f"Bearer {token}"}
    assert ask(gateway, experiment.public_model_id, "token-0", **bearer).status_code == 200

    database_proxy.cut()
    responses = [
        ask(gateway, experiment.public_model_id, f"token-{index}", **bearer) for index in (1, 2)
    ]

    assert [response.status_code for response in responses] == [200, 200]


def test_an_unknown_token_during_the_cut_gets_503_not_401_or_500(
    start_gateway, database_proxy, upstream
):
    experiment = active_experiment(upstream)
    gateway = start_gateway()
    wait_listed(gateway, experiment.public_model_id)
    database_proxy.cut()

    response = ask(
        gateway, experiment.public_model_id, "unknown", authorization="Bearer mxg_never-issued"
    )

    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
