"""The gateway end to end: a real uvicorn server, the demo upstream, the official SDKs."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from experiments.models import AllocationSubject, ExperimentRequest
from gateway.models import GatewayUsage
from gateway.tokens import create_token
from tests.factories import UserFactory
from tests.gateway_server import gateway, gateway_factory, requires_server, wait_for_rows  # noqa: F401
from tests.gateway_support import active_experiment, expected_variant_id, internal_id_of, wait_listed

pytestmark = requires_server

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def token():
    UserFactory(username="alice")
    _, plaintext = create_token(username="alice")
    return plaintext


def test_openai_sdk_chat_non_streaming_is_routed_and_blinded(gateway, upstream, token):
    exp = active_experiment(upstream)
    wait_listed(gateway, exp.public_model_id)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=token)
    completion = client.chat.completions.create(model=exp.public_model_id, messages=CHAT)
    assert completion.model == exp.public_model_id
    assert completion.choices[0].message.content
    sent = upstream.received[-1]
    assert sent["json"]["model"].startswith("secret-rc-")
    assert sent["headers"]["authorization"] == "Bearer sk-test-partner-key"
    assert token not in str(sent["headers"])
    wait_for_rows(1, 1)
    usage = GatewayUsage.objects.get()
    assert (usage.status_code, usage.is_stream, usage.has_error) == (200, False, False)
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.experiment_request.allocation_subject == AllocationSubject.USER
