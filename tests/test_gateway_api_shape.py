"""Everything under /v1/ answers in the OpenAI error shape (SPEC §8); the admin keeps its pages.

Driven in-process through the ASGI application uvicorn serves (``config.asgi``), so these run
on SQLite and on PostgreSQL alike.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from django.http import HttpResponse
from django.test import override_settings
from django.urls import include, path

from config.asgi import build_application, django_application
from config.gateway_handler import GatewayASGIHandler
from tests.test_gateway_handler import call

CANARY = "canary-7c1e"


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    return error


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/nothing-here", "/v1/chat/completions/", "/v1/models/x"])
def test_unknown_v1_path_is_an_openai_404(method, path):
    assert_openai_error(call_gateway(method, path), 404, "unknown_endpoint")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/responses", "POST"),
        ("DELETE", "/v1/messages", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
def test_wrong_method_is_an_openai_405_with_allow(method, path, allowed):
    response = call_gateway(method, path)
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed


def failing_view(request) -> HttpResponse:
    raise RuntimeError(f"boom {CANARY}")


urlpatterns = [path("v1/boom", failing_view), path("", include("config.urls"))]


def test_unexpected_failure_is_an_openai_500_even_with_debug_on(caplog):
    caplog.set_level(logging.INFO)
    with override_settings(ROOT_URLCONF=__name__, DEBUG=True):
        app = build_application(None, GatewayASGIHandler())
        response = call(app, "GET", "/v1/boom")
    error = assert_openai_error(response, 500, "internal_error")
    assert CANARY not in error["message"]
    assert "RuntimeError" in caplog.text
    assert CANARY not in caplog.text


def test_host_not_allowed_is_an_openai_400_and_the_host_is_not_logged(caplog):
    caplog.set_level(logging.INFO)
    response = call_gateway("GET", "/v1/models", headers={"host": f"{CANARY}.example"})
    assert_openai_error(response, 400, "invalid_request")
    assert "DisallowedHost" in caplog.text
    assert CANARY not in caplog.text


@pytest.mark.parametrize(
    "authorization",
    ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer   ", "Token abc", "", "sk-no-scheme"],
)
def test_authorization_that_is_not_a_bearer_token_is_401(settings, authorization):
    settings.GATEWAY_ALLOW_ANONYMOUS = True
    response = call_gateway(
        "POST",
        "/v1/chat/completions",
        json={"model": "kilo/x", "messages": []},
        headers={"authorization": authorization},
    )
    assert_openai_error(response, 401, "invalid_api_key")


def test_long_unknown_path_is_logged_escaped_and_capped(caplog):
    caplog.set_level(logging.INFO)
    tail = CANARY + "x" * 5000
    assert_openai_error(call_gateway("GET", "/v1/" + tail), 404, "unknown_endpoint")
    # The test's own HTTP client (httpx) logs the URL it called: only the gateway's lines count.
    served = [record.getMessage() for record in caplog.records if record.name != "httpx"]
    assert any("Not Found" in line for line in served)
    assert not any(tail in line for line in served)
    assert max(len(line) for line in served) < 400


def test_404_outside_v1_stays_an_html_page():
    app = build_application(django_application, GatewayASGIHandler())
    response = call(app, "GET", "/not-a-page")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")


def call_gateway(method: str, path: str, **kwargs) -> httpx.Response:
    return call(build_application(None, GatewayASGIHandler()), method, path, **kwargs)
