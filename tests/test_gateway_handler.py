"""The ASGI entry point serves gateway paths without the admin's middleware, and the admin with it.

Driven in-process through ``httpx.ASGITransport`` against ``config.asgi`` (the same callable
uvicorn serves), so these run on SQLite and on PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.conf import settings
from django.core import signals
from django.core.cache import caches
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler
from django.core.handlers.exception import convert_exception_to_response
from django.test import override_settings

from config.asgi import application, build_application
from config.gateway_handler import GatewayASGIHandler, is_gateway_path, run_boundary_hook
from tests.conftest import requires_postgres

ADMIN_CHAIN_HEADER = "x-test-admin-chain"


class MarkAdminChainMiddleware:
    """Appended to settings.MIDDLEWARE in one test: shows which chain served a response."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response[ADMIN_CHAIN_HEADER] = "ran"
        return response


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    """One request, on an event loop in a fresh thread: like a server's loop, it holds no
    database or cache connection of the test's own thread."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, **kwargs)

    with ThreadPoolExecutor(max_workers=1) as loop_thread:
        return loop_thread.submit(asyncio.run, send()).result()


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/v1/chat/completions", "", True),
        ("/v1/models", "", True),
        ("/healthz", "", True),
        ("/readyz", "", True),
        ("/gw/v1/messages", "/gw", True),
        ("/admin/", "", False),
        ("/admin/login/", "", False),
        ("/static/admin/css/base.css", "", False),
        ("/v1", "", False),
        ("/healthz/extra", "", False),
        ("/", "", False),
    ],
)
def test_gateway_paths_are_recognised_by_path_below_the_root_path(path, root_path, expected):
    assert is_gateway_path({"path": path, "root_path": root_path}) is expected


def test_gateway_paths_skip_the_admin_middleware_and_admin_paths_keep_it():
    with override_settings(
        MIDDLEWARE=[*settings.MIDDLEWARE, f"{__name__}.MarkAdminChainMiddleware"]
    ):
        app = build_application(ASGIHandler(), GatewayASGIHandler())
    gateway = call(app, "GET", "/healthz")
    admin = call(app, "GET", "/admin/login/")
    assert gateway.status_code == 200
    assert ADMIN_CHAIN_HEADER not in gateway.headers
    assert admin.headers[ADMIN_CHAIN_HEADER] == "ran"


def test_gateway_post_without_csrf_cookie_is_answered_by_the_view():
    response = call(
        application,
        "POST",
        "/v1/chat/completions",
        content=b"not json",
        headers={"content-type": "application/json", "cookie": "sessionid=stale-session"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_gateway_response_sets_no_cookie_and_does_not_vary_on_cookie():
    response = call(application, "GET", "/healthz", headers={"cookie": "sessionid=x; csrftoken=y"})
    assert "set-cookie" not in response.headers
    assert "cookie" not in response.headers.get("vary", "").lower()


def test_gateway_response_keeps_security_headers_and_content_length():
    response = call(application, "GET", "/healthz")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["content-length"] == str(len(response.content))


def test_admin_page_keeps_x_frame_options_and_sets_the_csrf_cookie():
    response = call(application, "GET", "/admin/login/")
    assert response.status_code == 200
    assert response.headers["x-frame-options"] == "DENY"
    assert "csrftoken=" in response.headers.get("set-cookie", "")


def test_admin_post_without_csrf_token_is_rejected():
    response = call(application, "POST", "/admin/login/", data={"username": "a", "password": "b"})
    assert response.status_code == 403


class BoundaryRecorder:
    """Records, per request-boundary signal, whether it ran on the event loop thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def started(self, **kwargs) -> None:
        self.calls.append(("started", self.on_loop()))

    def finished(self, **kwargs) -> None:
        self.calls.append(("finished", self.on_loop()))

    @staticmethod
    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True


@pytest.fixture
def boundaries():
    recorder = BoundaryRecorder()
    signals.request_started.connect(recorder.started, dispatch_uid="test-boundary-started")
    signals.request_finished.connect(recorder.finished, dispatch_uid="test-boundary-finished")
    yield recorder
    signals.request_started.disconnect(dispatch_uid="test-boundary-started")
    signals.request_finished.disconnect(dispatch_uid="test-boundary-finished")


def test_gateway_request_without_connections_runs_boundary_signals_once_inline(boundaries):
    response = call(application, "GET", "/healthz")
    assert response.status_code == 200
    assert boundaries.calls == [("started", True), ("finished", True)]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_gateway_request_that_used_the_database_sends_each_boundary_signal_once(boundaries):
    response = call(application, "GET", "/readyz")
    assert response.json()["database"] == "ok"
    assert [name for name, _ in boundaries.calls] == ["started", "finished"]


def test_boundary_hook_runs_in_a_sync_thread_when_the_context_holds_a_connection():
    ran_on_event_loop: list[bool] = []

    async def boundary() -> None:
        caches["default"].get("any-key")  # opens this context's cache connection
        await run_boundary_hook(lambda: ran_on_event_loop.append(BoundaryRecorder.on_loop()))

    with ThreadPoolExecutor(max_workers=1) as loop_thread:
        loop_thread.submit(asyncio.run, boundary()).result()
    assert ran_on_event_loop == [False]


#: Django code that config/gateway_handler.py copies, replaces or relies on, pinned by the
#: SHA-256 of its source (first 16 hex digits), with what to re-check when it changes.
DJANGO_SOURCES = [
    (ASGIHandler.handle, "98faeb5bef800331", "GatewayASGIHandler.handle is a copy of it"),
    (ASGIHandler.read_body, "cf4aa904631d5410", "GatewayASGIHandler.read_body is a bounded copy"),
    (
        BaseHandler.get_response_async,
        "ad82c920df0cebbb",
        "GatewayASGIHandler.get_response_async is a copy of it (logging inline)",
    ),
    (
        BaseHandler.load_middleware,
        "a1fb7ee5f8586195",
        "GatewayASGIHandler.load_middleware must set every attribute it sets",
    ),
    (
        convert_exception_to_response,
        "a297ae868bddaca2",
        "convert_exception_to_openai_error stands in for it on every layer of the chain",
    ),
    (ASGIHandler.create_request, "5eae59c6696013ff", "handle and refuse_body call it"),
    (
        ASGIHandler.listen_for_disconnect,
        "c729aa315c734f98",
        "handle runs it only once the body is read whole",
    ),
    (ASGIHandler.send_response, "77eda2b08689b44e", "refuse_body and handle send through it"),
    (ASGIHandler.run_get_response, "0234ea5fe09a5777", "handle calls it"),
]


@pytest.mark.parametrize(
    ("function", "pinned", "recheck"),
    DJANGO_SOURCES,
    ids=[function.__qualname__ for function, _, _ in DJANGO_SOURCES],
)
def test_django_code_the_gateway_handler_copies_is_unchanged(function, pinned, recheck):
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == pinned, (
        f"Django's {function.__qualname__} changed (source SHA-256 {digest}, pinned {pinned}): "
        f"re-check config/gateway_handler.py ({recheck}), port the change, then update the pin."
    )
