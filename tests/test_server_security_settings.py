"""A server never runs on the development SECRET_KEY with DEBUG off; cookie and HSTS
settings come from the environment (issue 7, item 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.startup import check_server_settings
from tests.gateway_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SECURITY_SETTINGS = (
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
)


def environment(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", *SECURITY_SETTINGS)}
    env.update(overrides)
    return env


def settings_in_a_fresh_process(**env: str) -> subprocess.CompletedProcess:
    """The security settings as a process started with this environment reads them."""
    script = (
        "import json, django; django.setup(); from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n) for n in {list(SECURITY_SETTINGS)!r}}}))"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=environment(DJANGO_SETTINGS_MODULE="config.settings", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_server_with_debug_off_refuses_to_start_on_the_development_secret_key():
    server = subprocess.run(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(free_port())],
        cwd=ROOT,
        env=environment(DEBUG="false"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert server.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set" in server.stderr + server.stdout


def test_startup_check_refuses_the_development_key_with_debug_off(settings):
    settings.DEBUG = False
    settings.SECRET_KEY = settings.DEVELOPMENT_SECRET_KEY
    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY"):
        check_server_settings()


def test_startup_check_allows_the_development_key_with_debug_on(settings):
    settings.DEBUG = True
    settings.SECRET_KEY = settings.DEVELOPMENT_SECRET_KEY
    check_server_settings()


def test_startup_names_an_unusable_encryption_key_without_refusing_to_serve(settings, caplog):
    settings.BYOK_ENCRYPTION_KEY = ""
    check_server_settings()
    [record] = [r for r in caplog.records if r.name == "config.startup"]
    assert "BYOK_ENCRYPTION_KEY is not set" in record.getMessage()
    assert "Experimented model ids answer 503" in record.getMessage()


def test_cookie_and_hsts_settings_default_to_plain_http():
    result = settings_in_a_fresh_process()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SECURE_PROXY_SSL_HEADER": None,
    }


def test_cookie_and_hsts_settings_come_from_the_environment():
    result = settings_in_a_fresh_process(
        SESSION_COOKIE_SECURE="true",
        CSRF_COOKIE_SECURE="true",
        SECURE_SSL_REDIRECT="true",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        SECURE_HSTS_PRELOAD="true",
        SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
    }


def test_malformed_proxy_ssl_header_is_a_clear_configuration_error():
    result = settings_in_a_fresh_process(SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO")
    assert result.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER must be two comma-separated values" in result.stderr
