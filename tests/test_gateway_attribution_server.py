"""What a running gateway writes into attribution rows: the subject's pseudonym (the
seed hash), copies of the usage measures, and nothing that identifies the subject."""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest

from experiments.models import USAGE_MEASURES, ExperimentRequest
from gateway.models import GatewayUsage
from gateway.tokens import create_token
from tests.factories import UserFactory
from tests.gateway_server import requires_server, wait_for_rows
from tests.gateway_support import active_experiment, wait_listed

pytestmark = requires_server

CHAT = [{"role": "user", "content": "hello"}]
MACHINE_ID = "machine-Zq9-attribution-probe"
LOOPBACK_IP = "127.0.0.1"  # the gateway's view of this test's client, without proxies


def _ask(gateway, model: str, headers: dict[str, str]) -> None:
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": model, "messages": CHAT},
        headers=headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text


def _expected_hash(experiment, kind: str, value: str) -> uuid.UUID:
    """SPEC §7 seed, hashed here independently of gateway.routing: first 16 bytes, as uuid."""
    seed = f"model_exp_{str(experiment.pk).lower()}_{kind}_{value}"
    return uuid.UUID(bytes=hashlib.sha256(seed.encode("utf-8")).digest()[:16])


@pytest.fixture
def user_token():
    user = UserFactory(username="attributed-user")
    _, plaintext = create_token(user=user)
    return user, plaintext


@pytest.fixture
def three_subjects_twice(gateway, upstream, user_token):
    """A user, a machine and an IP subject, two requests each; returns what is needed."""
    user, token = user_token
    experiment = active_experiment(upstream)
    wait_listed(gateway, experiment.public_model_id)
    subjects = {
        "user": (str(user.pk), {"authorization": f"Bearer {token}"}),
        "machine": (MACHINE_ID, {"x-kilocode-machineid": MACHINE_ID}),
        "ip": (LOOPBACK_IP, {}),
    }
    for _, headers in subjects.values():
        _ask(gateway, experiment.public_model_id, headers)
        _ask(gateway, experiment.public_model_id, headers)
    wait_for_rows(6, 6)
    return experiment, user, subjects


def _hashes_by_kind(experiment_rows) -> dict[str, list[uuid.UUID]]:
    found: dict[str, list[uuid.UUID]] = {}
    for row in experiment_rows:
        found.setdefault(row.allocation_subject, []).append(row.allocation_subject_hash)
    return found


def test_stored_subject_hash_is_the_sha256_of_the_bucketing_seed(three_subjects_twice):
    experiment, _, subjects = three_subjects_twice
    found = _hashes_by_kind(ExperimentRequest.objects.all())
    for kind, (value, _) in subjects.items():
        assert found[kind] == [_expected_hash(experiment, kind, value)] * 2, kind


def test_same_subject_same_hash_different_subjects_different_hashes(three_subjects_twice):
    found = _hashes_by_kind(ExperimentRequest.objects.all())
    assert sorted(found) == ["ip", "machine", "user"]
    assert all(len(set(hashes)) == 1 and None not in hashes for hashes in found.values())
    assert len({hashes[0] for hashes in found.values()}) == 3


def test_attribution_row_holds_no_user_id_machine_id_or_ip(three_subjects_twice):
    _, user, _ = three_subjects_twice
    field_names = {f.attname for f in ExperimentRequest._meta.concrete_fields}
    assert not {"user", "user_id", "machine_id", "ip", "client_ip"} & field_names
    for row in ExperimentRequest.objects.values():
        for name, value in row.items():
            if name == "usage_id":
                continue  # the usage row's id, not the subject
            assert value not in (user.pk, str(user.pk)), name
            assert MACHINE_ID not in str(value), name
            assert LOOPBACK_IP not in str(value), name


def test_attribution_row_carries_exact_copies_of_the_usage_measures(three_subjects_twice):
    for usage in GatewayUsage.objects.select_related("experiment_request"):
        attribution = usage.experiment_request
        for name in USAGE_MEASURES:
            assert getattr(attribution, name) == getattr(usage, name), name
        assert attribution.created_at == usage.created_at
