"""The gateway's own ASGI handler: Django's, without the admin's middleware stack.

Why: under ASGI every sync-style middleware hook (``MiddlewareMixin.__acall__``) runs
through ``sync_to_async``, a thread hop each; the admin's eight middleware cost the gateway
more than all of its own work per request. The gateway endpoints need none of them: they
authenticate with gateway tokens (never sessions or ``request.user``), are ``csrf_exempt``,
use no messages and serve no static files.

What stays, run inline on the event loop (their hooks only read the request and set
response headers, no I/O): Django's security headers (``SecurityMiddleware``),
``Content-Length`` on complete responses (``CommonMiddleware``), and ``X-Frame-Options``.
The URLconf and views are the same as for the admin; only the chain around them differs.

Request boundaries: Django's ``ASGIHandler.handle`` sends ``request_started`` and closes
the response (which sends ``request_finished``) through ``sync_to_async``, and so starts
and joins one thread per request. Their receivers (``close_old_connections``,
``reset_queries``, ``close_caches``, ``reset_urlconf``) act on the database and cache
connections of the handler's own context. The view runs in a task (a copy of that context),
so connections it opens are not among them, with Django's handler as with this one: at the
boundary that set is empty in practice and the receivers only reset per-context state. So
``handle`` below runs the hooks inline when the boundary context holds no connection, and
through ``sync_to_async`` exactly as Django does when it holds one.

Request bodies (SPEC §8): Django's ``read_body`` spools the whole body (to a temporary file
past ``FILE_UPLOAD_MAX_MEMORY_SIZE``) before any view runs, so a view cannot refuse a large
body in time. Here a declared ``Content-Length`` over ``GATEWAY_MAX_BODY_BYTES`` is refused
before a byte of the body is read, and a chunked body is cut off as soon as it goes over: at
most the limit is ever buffered. The refusal closes the connection, so the unread rest is
never read either.

Errors: every response of these paths is in the OpenAI error shape. Exceptions become
OpenAI-shaped responses here (never Django's HTML or debug pages), logged by type only;
4xx/5xx responses are logged inline with the client-controlled path escaped and capped.

Django's methods copied or relied on are pinned by ``tests/test_gateway_handler.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tempfile
from collections.abc import Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.cache import caches
from django.core.exceptions import (
    BadRequest,
    ImproperlyConfigured,
    RequestAborted,
    SuspiciousOperation,
)
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import connections
from django.http import Http404, HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import set_script_prefix, set_urlconf

from gateway import errors
from gateway.logsafe import loggable

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("django.request")

#: Paths the gateway handler serves (relative to the ASGI root path). Everything else,
#: the admin and its reports above all, goes through the full ``settings.MIDDLEWARE``.
GATEWAY_EXACT_PATHS = frozenset({"/healthz", "/readyz"})
GATEWAY_PATH_PREFIX = "/v1/"


def is_gateway_path(scope: dict) -> bool:
    path = scope.get("path", "")
    root_path = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return path.startswith(GATEWAY_PATH_PREFIX) or path in GATEWAY_EXACT_PATHS


class InlineHooks:
    """Run a ``MiddlewareMixin``'s hooks directly instead of through ``sync_to_async``.

    Only for middleware whose hooks do no I/O and touch no thread-bound state.
    """

    async def __acall__(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class InlineSecurityMiddleware(InlineHooks, SecurityMiddleware):
    pass


class InlineCommonMiddleware(InlineHooks, CommonMiddleware):
    pass


class InlineXFrameOptionsMiddleware(InlineHooks, XFrameOptionsMiddleware):
    pass


#: Outermost first, in the same relative order as in ``settings.MIDDLEWARE``.
GATEWAY_MIDDLEWARE = (
    InlineSecurityMiddleware,
    InlineCommonMiddleware,
    InlineXFrameOptionsMiddleware,
)


#: Hooks this lean chain does not run; a middleware needing one does not belong in it.
UNSUPPORTED_HOOKS = ("process_view", "process_template_response", "process_exception")


class BodyTooLarge(Exception):
    """The request body is declared, or has grown, larger than ``GATEWAY_MAX_BODY_BYTES``."""


def declared_length(scope: dict) -> int | None:
    """The request's declared ``Content-Length``, if any (uvicorn refuses a malformed one)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def exception_response(request, exc: Exception) -> HttpResponse:
    """The OpenAI-shaped response for an exception that escaped a view or middleware.

    Logged by type only: an exception's message may carry request data or a partner key.
    """
    if isinstance(exc, Http404):
        return errors.unknown_endpoint().response()
    if isinstance(exc, (SuspiciousOperation, BadRequest)):
        # E.g. DisallowedHost: a Host header outside ALLOWED_HOSTS.
        logger.warning("gateway request refused (%s)", type(exc).__name__)
        return errors.bad_request("The request is malformed or not allowed.").response()
    logger.error(
        "gateway request failed unexpectedly (%s) on %s",
        type(exc).__name__,
        loggable(request.path),
    )
    return errors.internal_error().response()


def convert_exception_to_openai_error(get_response: Callable) -> Callable:
    """The gateway's ``convert_exception_to_response``: the same wrapping of every layer of the
    chain, with OpenAI-shaped errors, computed inline (Django hops to a thread for it)."""

    async def inner(request):
        try:
            return await get_response(request)
        except Exception as exc:
            return exception_response(request, exc)

    return inner


async def refuse_too_large(request) -> HttpResponse:
    return errors.body_too_large(settings.GATEWAY_MAX_BODY_BYTES).response()


class GatewayASGIHandler(ASGIHandler):
    """``ASGIHandler`` whose middleware chain is ``GATEWAY_MIDDLEWARE``, all async-native."""

    def load_middleware(self, is_async: bool = False) -> None:
        if not is_async:
            raise RuntimeError("GatewayASGIHandler serves ASGI only.")
        for middleware in GATEWAY_MIDDLEWARE:
            if any(hasattr(middleware, hook) for hook in UNSUPPORTED_HOOKS):
                raise ImproperlyConfigured(f"{middleware.__name__} needs a full middleware chain.")
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = self.wrap_in_middleware(self._get_response_async)
        # A refused body's answer gets the same response headers as a view's.
        self._refusal_chain = self.wrap_in_middleware(refuse_too_large)

    @staticmethod
    def wrap_in_middleware(get_response: Callable) -> Callable:
        handler = convert_exception_to_openai_error(get_response)
        for middleware in reversed(GATEWAY_MIDDLEWARE):
            handler = convert_exception_to_openai_error(middleware(handler))
        return handler

    async def get_response_async(self, request) -> HttpResponse:
        """Django 5.2's ``BaseHandler.get_response_async``, logging an error response inline
        (Django hops to a thread) with the client-controlled path escaped and capped."""
        set_urlconf(settings.ROOT_URLCONF)
        response = await self._middleware_chain(request)
        response._resource_closers.append(request.close)
        if response.status_code >= 400:
            request_logger.log(
                logging.ERROR if response.status_code >= 500 else logging.WARNING,
                "%s: %s",
                response.reason_phrase,
                loggable(request.path),
                extra={"status_code": response.status_code, "request": request},
            )
        return response

    async def read_body(self, receive, declared: int | None = None):
        """Django 5.2's ``ASGIHandler.read_body``, bounded by ``GATEWAY_MAX_BODY_BYTES``.

        Raises ``BodyTooLarge`` before receiving anything when the declared length is over
        the limit, and as soon as the received bytes go over it (the chunk that crosses is
        not kept), so at most the limit is ever buffered.
        """
        limit = settings.GATEWAY_MAX_BODY_BYTES
        if declared is not None and declared > limit:
            raise BodyTooLarge
        body_file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (the request closes it)
            max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, mode="w+b"
        )
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                body_file.close()
                raise RequestAborted()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                body_file.close()
                raise BodyTooLarge
            body_file.write(chunk)
            if not message.get("more_body", False):
                break
        body_file.seek(0)
        return body_file

    async def refuse_body(self, scope, send) -> None:
        """Answer 400 ``too_large`` without reading the body, and close the connection so
        that the server does not read (and discard) the rest of it either."""
        set_script_prefix(get_script_prefix(scope))
        await run_boundary_hook(signals.request_started.send, sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, io.BytesIO())
        if request is not None:
            response = await self._refusal_chain(request)
        response["Connection"] = "close"
        await self.send_response(response, send)
        await run_boundary_hook(response.close)

    async def handle(self, scope, receive, send) -> None:
        """Django 5.2's ``ASGIHandler.handle``, with the body bounded (``read_body``,
        ``refuse_body``) and the request-boundary hooks of ``run_boundary_hook`` instead of
        unconditional ``sync_to_async`` calls."""
        try:
            body_file = await self.read_body(receive, declared_length(scope))
        except RequestAborted:
            return
        except BodyTooLarge:
            await self.refuse_body(scope, send)
            return
        set_script_prefix(get_script_prefix(scope))
        await run_boundary_hook(signals.request_started.send, sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            await run_boundary_hook(error_response.close)
            return

        async def process_request(request, send):
            response = await self.run_get_response(request)
            # The client may disconnect during send_response.
            with contextlib.suppress(asyncio.CancelledError):
                await self.send_response(response, send)
            return response

        # Watch for a disconnect while the response is produced (as Django does).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                # The view sees the cancellation (the gateway records a 499).
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await run_boundary_hook(signals.request_finished.send, sender=self.__class__)
        else:
            await run_boundary_hook(response.close)
        body_file.close()


def request_holds_connections() -> bool:
    """Whether the current context (and thread) holds a database or cache connection."""
    return bool(connections.all(initialized_only=True) or caches.all(initialized_only=True))


async def run_boundary_hook(hook, *args, **kwargs):
    """Run a request-boundary hook (a signal send, ``response.close``).

    Inline when the context holds no connection: the receivers then only reset
    per-context state. Otherwise in the request's sync thread, as Django does, because a
    database connection may not be used from the event loop.
    """
    if request_holds_connections():
        return await sync_to_async(hook)(*args, **kwargs)
    return hook(*args, **kwargs)
