"""The gateway HTTP API (SPEC §8): async views, one request path for the three API shapes.

Path of a model request: authenticate → read and check the body → route (in-process
membership and payload copies) → transform → call the partner → blind the answer →
hand a usage record to the background writer once the response is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from experiments.feedback import check_feedback, record_feedback
from experiments.models import FeedbackSource, RequestKind
from experiments.prompts.answers import CapturedAnswer, is_sampled
from gateway import auth, errors
from gateway.blinding import Blinder, FinishReason, TokenUsage, client_headers
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
#: Deeper JSON is refused: past it a body could exhaust the recursion limit of any code that
#: walks it (serialising it upstream, capturing the prompt), serde_json's default bound.
MAX_JSON_DEPTH = 128
#: As long as a public model id may be (experiments.services).
MAX_MODEL_ID_LENGTH = 255
#: A JSON escape of a UTF-16 surrogate (high: D800-DBFF, low: DC00-DFFF).
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
#: Status recorded when the client went away before the response completed (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


#: Python's decoder, refusing NaN and Infinity (not JSON; a partner may choke on them).
#: Built once: ``json.loads`` with any option builds a decoder per call.
JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _elapsed_ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


class Exchange:
    """What one model request did, turned into a usage record exactly once."""

    def __init__(
        self, *, kind: str, user_id: int | None, started: float, client_request_id: str | None
    ) -> None:
        self.kind = kind
        self.user_id = user_id
        self.started = started
        self.created_at = timezone.now()
        self.public_model_id = ""
        self.is_stream = False
        self.client_request_id = client_request_id
        self.route: Route | None = None
        self.upstream_body: dict[str, Any] | None = None
        self.status = 200
        self.error_kind: str | None = None
        self.ttfb_ms: int | None = None
        self.tokens = TokenUsage()
        self.finish = FinishReason()
        #: The usage row's id, fixed now: response capture samples by it.
        self.usage_id = uuid.uuid4()
        #: The captured answer of a sampled request, once there is one to store.
        self.answer: CapturedAnswer | None = None
        self._recorded = False

    def sample_answer(self, route: Route, blinder: Blinder) -> CapturedAnswer | None:
        """A capture for this request's answer, if its experiment samples it (else None)."""
        if route.capture_basis_points and is_sampled(self.usage_id, route.capture_basis_points):
            return CapturedAnswer(self.kind, scrub=blinder.scrubber.text)
        return None

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
                answer=self.answer,
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
                finish_reason=self.finish.normalised,
                ttfb_ms=self.ttfb_ms,
                total_ms=_elapsed_ms(self.started),
                attribution=attribution,
                id=self.usage_id,
            )
        )


# --- body checks ------------------------------------------------------------------


def read_json_object(request, limit: int, *, not_an_object: str) -> dict[str, Any]:
    """The request body as a JSON object of at most ``limit`` bytes: strict UTF-8, nested at
    most ``MAX_JSON_DEPTH`` deep, no lone surrogates or NUL; a 400 for anything else.

    No second parse: depth is checked by a walk of the parsed containers and lone
    surrogates by one regular-expression scan of the text (precise only if it finds one).
    """
    # The gateway's ASGI handler refuses a larger body before reading it; this bound holds
    # under any other handler (WSGI, Django's test client).
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise errors.body_too_large(limit)
    try:
        # Strict UTF-8 (RFC 8259): refuses invalid bytes and raw surrogate code points.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_unicode() from None
    try:
        body = JSON_DECODER.decode(text)
    except RecursionError:
        raise too_deep() from None
    except ValueError:
        raise errors.bad_request("Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise errors.bad_request(not_an_object, code="invalid_body")
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise too_deep()
    if has_lone_surrogate(text):
        raise invalid_unicode()
    # SPEC §8: NUL gets a 400. A raw NUL is already invalid JSON; an escaped one is looked
    # for only when the text holds the escape at all (rare), so the common case costs one
    # substring search.
    if "\\u0000" in text and holds_nul(body):
        raise errors.bad_request(
            "Request body must not contain NUL characters.", code="invalid_unicode"
        )
    return body


def read_json_body(request) -> dict[str, Any]:
    """The request body as a JSON object with a usable ``model``; a 400 for anything else."""
    limit = settings.GATEWAY_MAX_BODY_BYTES
    body = read_json_object(request, limit, not_an_object="Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise errors.bad_request("`model` must be a non-empty string.", code="invalid_model")
    # The model id is stored in usage rows and may be logged: printable only (no NUL, lone
    # surrogate, newline or format character) and bounded.
    if len(model) > MAX_MODEL_ID_LENGTH or not model.isprintable():
        raise errors.bad_request(
            f"`model` must be at most {MAX_MODEL_ID_LENGTH} printable characters.",
            code="invalid_model",
        )
    return body


def too_deep() -> GatewayError:
    return errors.bad_request(
        f"Request body is nested deeper than {MAX_JSON_DEPTH} levels.", code="too_deep"
    )


def invalid_unicode() -> GatewayError:
    return errors.bad_request(
        "Request body is not valid Unicode (invalid UTF-8 or a lone surrogate).",
        code="invalid_unicode",
    )


def holds_nul(value: dict | list) -> bool:
    """Whether any string (or object key) of a parsed JSON value holds U+0000."""
    pending: list[Any] = [value]
    while pending:
        node = pending.pop()
        if type(node) is dict:
            for name, child in node.items():
                if "\x00" in name:
                    return True
                pending.append(child)
        elif type(node) is list:
            pending.extend(node)
        elif type(node) is str and "\x00" in node:
            return True
    return False


def nested_deeper_than(value: dict | list, limit: int) -> bool:
    """Whether the objects and arrays of a parsed JSON value nest more than ``limit`` levels
    (``value`` is level 1). Level by level, without recursion, so any depth is safe."""
    level = [value]
    for _ in range(limit):
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                # json.loads builds exactly these types: an identity test is the cheapest.
                if type(child) is dict or type(child) is list:
                    below.append(child)
        if not below:
            return False
        level = below
    return True


def has_lone_surrogate(text: str) -> bool:
    """Whether valid JSON ``text`` decodes to a string holding an unpaired surrogate.

    Raw surrogates are refused by strict UTF-8 decoding, so only ``\\uD800``-style escapes
    can produce one; an escaped high surrogate pairs only with a low one right after it.
    """
    if SURROGATE_ESCAPE.search(text) is None:
        return False
    # Escaped backslashes out of the way (same length, so nothing becomes adjacent): every
    # "\\u" left begins an escape.
    text = text.replace("\\\\", "..")
    high_end = None  # where the last unpaired high surrogate escape ends
    for escape in SURROGATE_ESCAPE.finditer(text):
        if escape.group()[3] in "89abAB":
            if high_end is not None:
                return True
            high_end = escape.end()
        elif high_end != escape.start():
            return True
        else:
            high_end = None
    return high_end is not None


def client_request_id(request) -> str | None:
    """``X-Kilo-Request``, stored as sent in attribution rows for feedback joins.

    Refused (400) rather than altered when it could not be stored exactly: over the length
    bound, or holding a character that is not printable (a truncated or cleaned id would
    silently break the join it exists for).
    """
    value = request.headers.get("x-kilo-request", "").strip()
    if len(value) > MAX_CLIENT_REQUEST_ID_LENGTH or not value.isprintable():
        raise errors.bad_request(
            f"`X-Kilo-Request` must be at most {MAX_CLIENT_REQUEST_ID_LENGTH} printable "
            "characters.",
            code="invalid_header",
        )
    return value or None


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
    if not writer.accepting:
        # Evidence first: a request this process cannot record is one it does not serve.
        return errors.usage_spool_full().response()
    try:
        user_id = await auth.authenticate(request)
        body = read_json_body(request)
        request_id = client_request_id(request)
    except GatewayError as exc:
        # Refused before routing: no usage row (SPEC §9 counts requests that reached routing).
        return exc.response()
    exchange = Exchange(kind=kind, user_id=user_id, started=started, client_request_id=request_id)
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
    blinder = Blinder.for_route(route, kind)
    exchange.tokens = blinder.usage
    exchange.finish = blinder.finish
    upstream = await shared_client.send(
        upstream_request(request.headers, route, kind, exchange.upstream_body)
    )
    # Only successful answers are captured; at a rate of 0 this is one integer test.
    answer = exchange.sample_answer(route, blinder) if upstream.status < 400 else None
    if upstream.status < 400 and upstream.is_event_stream:
        exchange.first_byte()
        # What the client saw is captured, also when the stream is cut later.
        exchange.answer = answer
        return StreamingHttpResponse(
            relay(exchange, upstream, EventRewriter(blinder), kind, answer),
            content_type="text/event-stream; charset=utf-8",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    read_whole = False
    try:
        raw = await upstream.read(settings.GATEWAY_MAX_UPSTREAM_BODY_BYTES)
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
        if answer is not None:
            # The bytes the client gets (blinded, key scrubbed); assembled by the writer.
            answer.body = content
            exchange.answer = answer
        response = HttpResponse(content, status=upstream.status, content_type="application/json")
    for name, value in client_headers(upstream.headers).items():
        response[name] = value
    return response


async def relay(
    exchange: Exchange,
    upstream: UpstreamResponse,
    rewriter: EventRewriter,
    kind: str,
    answer: CapturedAnswer | None = None,
):
    """Relay events as they arrive; end with an error event if the upstream fails mid-way.

    A sampled answer keeps a reference to each relayed chunk (bounded); nothing else.
    """
    completed = False
    try:
        fault: GatewayError | None = None
        try:
            async for raw in sse_events(
                upstream.chunks(), max_event_bytes=settings.GATEWAY_MAX_SSE_EVENT_BYTES
            ):
                out = rewriter.event(raw)
                if out:
                    if answer is not None:
                        answer.add(out)
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
            if answer is not None:
                answer.add(held)
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


def allow_methods(*methods: str) -> Callable[[Callable], Callable]:
    """Django's ``require_http_methods`` with an OpenAI-shaped 405 (and its ``Allow``)."""

    def decorator(view):
        @functools.wraps(view)
        async def checked(request, *args, **kwargs) -> HttpResponse:
            if request.method not in methods:
                response = errors.method_not_allowed(methods).response()
                response["Allow"] = ", ".join(methods)
                return response
            return await view(request, *args, **kwargs)

        return checked

    return decorator


@csrf_exempt
@allow_methods("POST")
async def chat_completions(request) -> HttpResponse:
    return await proxy(request, RequestKind.CHAT_COMPLETIONS)


@csrf_exempt
@allow_methods("POST")
async def responses(request) -> HttpResponse:
    return await proxy(request, RequestKind.RESPONSES)


@csrf_exempt
@allow_methods("POST")
async def messages(request) -> HttpResponse:
    return await proxy(request, RequestKind.MESSAGES)


#: A feedback body is small: an id, a rating and a comment of at most 4,000 characters.
MAX_FEEDBACK_BODY_BYTES = 64 * 1024


def read_feedback_body(request) -> dict[str, Any]:
    """The body of ``POST /v1/feedback`` as a JSON object; a 400 for anything else."""
    return read_json_object(
        request,
        MAX_FEEDBACK_BODY_BYTES,
        not_an_object='Request body must be a JSON object: {"client_request_id": "...", '
        '"rating": "up" or "down", "comment": "..."}.',
    )


def _store_feedback(item, user_id: int | None):
    try:
        (stored,) = record_feedback([item], source=FeedbackSource.API, submitted_by_id=user_id)
    except DatabaseError:
        # A connection that failed is not asked again: the next feedback reconnects.
        with contextlib.suppress(Exception):
            connection.close()
        raise
    return stored


@csrf_exempt
@allow_methods("POST")
async def feedback(request) -> HttpResponse:
    """``POST /v1/feedback`` (SPEC §12): what a user said about the answer to a request.

    Stored with the token's user (None when anonymous), never an IP; joined to the
    checkpoint that served the request now or when its attribution row lands.
    """
    try:
        user_id = await auth.authenticate(request)
        body = read_feedback_body(request)
    except GatewayError as exc:
        return exc.response()
    item, problems = check_feedback(
        body.get("client_request_id"), body.get("rating"), body.get("comment")
    )
    if problems:
        return errors.bad_request(" ".join(problems), code="invalid_feedback").response()
    try:
        # The request thread, as the token check uses: a database that cannot be reached
        # fails within the connect timeout (settings), and then answers 503.
        stored = await sync_to_async(_store_feedback)(item, user_id)
    except DatabaseError as exc:
        logger.warning("feedback not stored: database unavailable (%s)", type(exc).__name__)
        return errors.unavailable(
            "Feedback cannot be stored right now; retry shortly.", error_kind="feedback_unavailable"
        ).response()
    return errors.json_response(
        {"object": "feedback", "id": str(stored.id), "status": "accepted"}, status=202
    )


@csrf_exempt
async def unknown_endpoint(request) -> HttpResponse:
    """Any other path under /v1/: an OpenAI-shaped 404, whatever the method."""
    return errors.unknown_endpoint().response()


@allow_methods("GET")
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
    spool_ok = writer.accepting
    ready = database and cache_ok and spool_ok
    return JsonResponse(
        {
            "status": "ready" if ready else "unavailable",
            "database": "ok" if database else "unavailable",
            "cache": "ok" if cache_ok else "unavailable",
            # "full": model requests get 503 usage_spool_full until the spool drains.
            "usage_spool": "ok" if spool_ok else "full",
        },
        status=200 if ready else 503,
    )
