"""Connection tests of checkpoints: one small request, sent the way the gateway sends.

The default ``settings.CHECKPOINT_CHECKER``. The request goes through the gateway's own
pieces (transforms, the partner headers and key, the aiohttp client and its one error
mapping, blinding), so a checkpoint that fails here fails for clients too, with the
same status. The outcome names the status, the latency and the partner's error blinded
as a client would see it; never the key.
"""

from __future__ import annotations

import asyncio
import json
import time

from django.conf import settings

from experiments.models import RequestKind
from experiments.probes import CheckOutcome, CheckpointProbe
from experiments.upstream import api_family
from gateway.blinding import Blinder, KeyScrubber, checkpoint_identifiers
from gateway.errors import GatewayError
from gateway.routing import Route
from gateway.transforms import transform_body
from gateway.upstream_client import UpstreamClient, upstream_request

PROMPT = "Reply with one word: ok."
#: The smallest request of each API family (Responses requires at least 16 output tokens).
PROBE_BODIES = {
    RequestKind.CHAT_COMPLETIONS: {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1,
    },
    RequestKind.MESSAGES: {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1},
    RequestKind.RESPONSES: {"input": PROMPT, "max_output_tokens": 16},
}
#: What an Anthropic SDK sends; partners speaking messages refuse requests without it.
CLIENT_HEADERS = {RequestKind.MESSAGES: {"anthropic-version": "2023-06-01"}}


def check_checkpoint(probe: CheckpointProbe) -> CheckOutcome:
    """Run one test request to completion (called from sync code: admin views, commands)."""
    return asyncio.run(_check(probe))


async def _check(probe: CheckpointProbe) -> CheckOutcome:
    kind = api_family(probe.upstream)
    internal_id = str(probe.upstream["internal_id"])
    base_url = str(probe.upstream["base_url"]).rstrip("/")
    route = Route(
        public_model_id=probe.public_model_id,
        base_url=base_url,
        api_key=probe.api_key,
        internal_id=internal_id,
        upstream=probe.upstream,
        identifiers=checkpoint_identifiers(((base_url, internal_id),)),
    )
    body = transform_body(
        {"model": probe.public_model_id, **PROBE_BODIES[kind]},
        probe.upstream,
        internal_id=internal_id,
        kind=kind,
    )
    client = UpstreamClient(timeout=settings.CHECKPOINT_CHECK_TIMEOUT_SECONDS)
    started = time.monotonic()
    try:
        response = await client.send(
            upstream_request(CLIENT_HEADERS.get(kind, {}), route, kind, body)
        )
        try:
            raw = await response.read(settings.GATEWAY_MAX_UPSTREAM_BODY_BYTES)
        finally:
            response.close(reusable=False)
    except GatewayError as exc:
        return CheckOutcome(False, None, _elapsed_ms(started), exc.message)
    finally:
        await client.aclose()
    latency = _elapsed_ms(started)
    blinder = Blinder(probe.public_model_id, KeyScrubber(probe.api_key), route.identifiers)
    if response.status >= 400:
        error = json.loads(blinder.error_body(raw, response.status))["error"]
        return CheckOutcome(False, response.status, latency, error["message"])
    try:
        blinder.body(raw)
    except (ValueError, UnicodeDecodeError):
        return CheckOutcome(
            False, response.status, latency, "The answer is not JSON: clients would get 502."
        )
    return CheckOutcome(True, response.status, latency)


def _elapsed_ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)
