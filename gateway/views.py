"""The gateway HTTP API (SPEC §8): async views, one request path for the three API shapes.

Path of a model request: authenticate → read and check the body → route (in-process
membership and payload copies) → transform → call the partner → blind the answer →
hand a usage record to the background writer once the response is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from experiments.models import RequestKind
from gateway import auth, errors
from gateway.blinding import Blinder, TokenUsage, client_headers
from gateway.errors import GatewayError
from gateway.routing import Route, RoutingUnavailable, router
from gateway.streaming import EventRewriter, MalformedEvent, error_event, sse_events
from gateway.subjects import allocation_subject
from gateway.transforms import transform_body
from gateway.upstream_client import (
    UpstreamResponse,
    fetch_default_models,
    shared_client,
    upstream_request,
)
from gateway.usage import Attribution, UsageRecord, writer

logger = logging.getLogger(__name__)

MAX_CLIENT_REQUEST_ID_LENGTH = 512
#: Status recorded when the client went away before the response completed (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


def _elapsed_ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


class Exchange:
    """What one model request did, turned into a usage record exactly once."""

    def __init__(self, *, kind: str, user_id: int | None, started: float, request) -> None:
        self.kind = kind
        self.user_id = user_id
        self.started = started
        self.created_at = timezone.now()
        self.public_model_id = ""
        self.is_stream = False
        self.client_request_id = (
            request.headers.get("x-kilo-request", "").strip()[:MAX_CLIENT_REQUEST_ID_LENGTH] or None
        )
        self.route: Route | None = None
        self.upstream_body: dict[str, Any] | None = None
        self.status = 200
        self.error_kind: str | None = None
        self.ttfb_ms: int | None = None
        self.tokens = TokenUsage()
        self._recorded = False

    def first_byte(self) -> None:
        if self.ttfb_ms is None:
            self.ttfb_ms = _elapsed_ms(self.started)

    def failed(self, status: int, error_kind: str) -> None:
        self.status = status
        self.error_kind = error_kind

    def record(self) -> None:
        if self._recorded:
            return
        self._recorded = True
        route = self.route
        attribution = None
        if route is not None and route.is_experimented:
            attribution = Attribution(
                version_id=route.version_id,
                allocation_subject=route.subject_kind,
                allocation_subject_hash=route.subject_hash,
                client_request_id=self.client_request_id,
                upstream_body=self.upstream_body,
            )
        writer.submit(
            UsageRecord(
                created_at=self.created_at,
                user_id=self.user_id,
                public_model_id=self.public_model_id,
                request_kind=self.kind,
                is_stream=self.is_stream,
                status_code=self.status,
                has_error=self.error_kind is not None,
                error_kind=self.error_kind,
                input_tokens=self.tokens.input_tokens,
                output_tokens=self.tokens.output_tokens,
                ttfb_ms=self.ttfb_ms,
                total_ms=_elapsed_ms(self.started),
                attribution=attribution,
            )
        )


# --- body checks ------------------------------------------------------------------


def read_json_body(request) -> dict[str, Any]:
    from django.conf import settings

    limit = settings.GATEWAY_MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise errors.bad_request(f"Request body is larger than {limit} bytes.", code="too_large")
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise errors.bad_request(f"Request body is larger than {limit} bytes.", code="too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise errors.bad_request("Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise errors.bad_request("Request body must be a JSON object.", code="invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.bad_request("`model` must be a non-empty string.", code="invalid_model")
    return body


def check_field_types(body: dict[str, Any], kind: str) -> None:
    if "stream" in body and not isinstance(body["stream"], bool):
        raise errors.bad_request("`stream` must be a boolean.", code="invalid_type")
    needs_messages = kind in (RequestKind.CHAT_COMPLETIONS, RequestKind.MESSAGES)
    if needs_messages and not isinstance(body.get("messages"), list):
        raise errors.bad_request("`messages` must be a list.", code="invalid_type")
    bad_input = "input" in body and not isinstance(body["input"], (str, list))
    if kind == RequestKind.RESPONSES and bad_input:
        raise errors.bad_request("`input` must be a string or a list.", code="invalid_type")


# --- the request path ---------------------------------------------------------------


async def proxy(request, kind: str) -> HttpResponse:
    started = time.monotonic()
    try:
        user_id = await auth.authenticate(request)
        body = read_json_body(request)
    except GatewayError as exc:
        return exc.response()
    exchange = Exchange(kind=kind, user_id=user_id, started=started, request=request)
    exchange.public_model_id = body["model"]
    exchange.is_stream = body.get("stream") is True
    streaming = False
    try:
        route = await router.resolve(body["model"], lambda: allocation_subject(request, user_id))
        exchange.route = route
        exchange.upstream_body = transform_body(
            body, route.upstream, internal_id=route.internal_id, kind=kind
        )
        check_field_types(body, kind)
        response = await call_upstream(request, exchange, route, kind)
        streaming = isinstance(response, StreamingHttpResponse)
        return response
    except GatewayError as exc:
        exchange.failed(exc.status, exc.error_kind)
        return exc.response()
    except asyncio.CancelledError:
        exchange.failed(CLIENT_CLOSED_REQUEST, "client_disconnected")
        raise
    except Exception as exc:
        # Never let Django render an unexpected failure: a debug page or traceback could
        # show request internals (the partner key lives in this frame's callees).
        logger.error("gateway request failed unexpectedly (%s)", type(exc).__name__)
        fault = errors.internal_error()
        exchange.failed(fault.status, fault.error_kind)
        return fault.response()
    finally:
        # A streaming response records itself when its stream ends.
        if not streaming:
            exchange.record()


async def call_upstream(request, exchange: Exchange, route: Route, kind: str) -> HttpResponse:
    blinder = Blinder.for_route(route)
    exchange.tokens = blinder.usage
    upstream = await shared_client.send(
        upstream_request(request.headers, route, kind, exchange.upstream_body)
    )
    if upstream.status < 400 and upstream.is_event_stream:
        exchange.first_byte()
        return StreamingHttpResponse(
            relay(exchange, upstream, EventRewriter(blinder), kind),
            content_type="text/event-stream; charset=utf-8",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    read_whole = False
    try:
        raw = await upstream.read()
        read_whole = True
    finally:
        upstream.close(reusable=read_whole)
    exchange.first_byte()
    if upstream.status >= 400:
        exchange.failed(upstream.status, f"upstream_http_{upstream.status}")
        response = HttpResponse(
            blinder.error_body(raw, upstream.status),
            status=upstream.status,
            content_type="application/json",
        )
    else:
        try:
            content = blinder.body(raw)
        except (ValueError, UnicodeDecodeError):
            raise errors.upstream_malformed() from None
        response = HttpResponse(content, status=upstream.status, content_type="application/json")
    for name, value in client_headers(upstream.headers).items():
        response[name] = value
    return response


async def relay(exchange: Exchange, upstream: UpstreamResponse, rewriter: EventRewriter, kind: str):
    """Relay events as they arrive; end with an error event if the upstream fails mid-way."""
    completed = False
    try:
        fault: GatewayError | None = None
        try:
            async for raw in sse_events(
                upstream.chunks(), max_event_bytes=settings.GATEWAY_MAX_SSE_EVENT_BYTES
            ):
                out = rewriter.event(raw)
                if out:
                    yield out
            if not rewriter.finished:
                fault = errors.upstream_cut()
        except MalformedEvent:
            fault = errors.upstream_malformed()
        except GatewayError as exc:
            fault = exc
        try:
            held = rewriter.flush()
        except MalformedEvent:
            held, fault = b"", fault or errors.upstream_malformed()
        if held:
            yield held
        if fault is not None:
            # Headers (200) are already sent: the status stays, the error is in the stream.
            exchange.error_kind = fault.error_kind
            yield error_event(kind, fault.message, error_type=fault.error_type, code=fault.code)
        elif rewriter.upstream_error:
            exchange.error_kind = "upstream_stream_error"
        completed = True
    except asyncio.CancelledError:
        exchange.failed(CLIENT_CLOSED_REQUEST, "client_disconnected")
        raise
    finally:
        if not completed and exchange.error_kind is None:
            exchange.failed(CLIENT_CLOSED_REQUEST, "client_disconnected")
        # Closing a broken connection can fail; there is nothing more to learn from it.
        with contextlib.suppress(Exception):
            upstream.close(reusable=completed and fault is None)
        exchange.record()


@csrf_exempt
@require_POST
async def chat_completions(request) -> HttpResponse:
    return await proxy(request, RequestKind.CHAT_COMPLETIONS)


@csrf_exempt
@require_POST
async def responses(request) -> HttpResponse:
    return await proxy(request, RequestKind.RESPONSES)


@csrf_exempt
@require_POST
async def messages(request) -> HttpResponse:
    return await proxy(request, RequestKind.MESSAGES)


@require_GET
async def models(request) -> HttpResponse:
    try:
        await auth.authenticate(request)
    except GatewayError as exc:
        return exc.response()
    try:
        ids = await router.callable_ids()
    except RoutingUnavailable:
        return errors.routing_unavailable().response()
    listed = list(dict.fromkeys([*ids, *await fetch_default_models()]))
    return errors.json_response(
        {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": 0, "owned_by": "kilo"}
                for model_id in listed
            ],
        }
    )


async def healthz(request) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def _database_answers() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        return False


async def readyz(request) -> HttpResponse:
    database = await sync_to_async(_database_answers)()
    try:
        cache_ok = await asyncio.wait_for(router.store.ping(), timeout=2)
    except Exception:
        cache_ok = False
    ready = database and cache_ok
    return JsonResponse(
        {
            "status": "ready" if ready else "unavailable",
            "database": "ok" if database else "unavailable",
            "cache": "ok" if cache_ok else "unavailable",
        },
        status=200 if ready else 503,
    )
