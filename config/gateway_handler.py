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
"""

from __future__ import annotations

import asyncio
import contextlib

from asgiref.sync import sync_to_async
from django.core import signals
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import connections
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import set_script_prefix

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
        handler = convert_exception_to_response(self._get_response_async)
        for middleware in reversed(GATEWAY_MIDDLEWARE):
            handler = convert_exception_to_response(middleware(handler))
        self._middleware_chain = handler

    async def handle(self, scope, receive, send) -> None:
        """Django 5.2's ``ASGIHandler.handle``, with the request-boundary hooks of
        ``run_boundary_hook`` instead of unconditional ``sync_to_async`` calls."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
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
