"""Pytest plugin (``-p tests.gateway_server``): the gateway as a real uvicorn subprocess,
pointed at the pytest-django test database.

Tests using it need committed rows (``transactional_db``), PostgreSQL and Redis
(a second process cannot see SQLite's in-memory test database or a local-memory cache).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 20

requires_server = pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").split(":", 1)[0] not in ("postgres", "postgresql")
    or not os.environ.get("REDIS_URL"),
    reason="the gateway subprocess needs PostgreSQL and Redis shared with the test process",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url(address: tuple[str, int] | None = None) -> str:
    """The test database's URL, or the same database reached through ``address`` (a proxy)."""
    db = connection.settings_dict
    auth = quote(db["USER"] or "")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"])
    host, port = address or (db["HOST"] or "127.0.0.1", db["PORT"] or 5432)
    return f"postgres://{auth}@{host}:{port}/{db['NAME']}"


class GatewayServer:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.base_url = self.base + "/v1"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # Client IPs come from our own trusted-proxy setting, never uvicorn's.
                "--no-proxy-headers",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "10",
                # Longer than any stall of a loaded CI machine: with uvicorn's 5 s default
                # an idle pooled connection can be closed just as a test client reuses it.
                "--timeout-keep-alive",
                "120",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def server_env(tmp_dir: Path, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": test_database_url(),
            "DATABASE_CONN_MAX_AGE": "60",
            "PROMPT_STORE_DIR": str(tmp_dir / "prompts"),
            "GATEWAY_SPOOL_DIR": str(tmp_dir / "spool"),
            "GATEWAY_UPSTREAM_TIMEOUT": "3",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("TEST_DATABASE_NAME", None)
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def gateway_servers(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Callable]:
    """Start (once per distinct environment and session) a gateway server; returns it."""
    servers: dict[tuple, GatewayServer] = {}
    tmp_dir = tmp_path_factory.mktemp("gateway")

    def start(**overrides: str) -> GatewayServer:
        key = tuple(sorted(overrides.items()))
        if key not in servers:
            with django_db_blocker.unblock():
                env = server_env(tmp_dir, **overrides)
            servers[key] = GatewayServer(env, tmp_dir / f"server-{len(servers)}.log")
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture
def gateway_factory(gateway_servers, transactional_db) -> Iterator[Callable]:
    """``gateway_factory(**env_overrides)``: the session's server for that environment.

    When the test ends, waits until the rows of its requests have landed: a server's writer
    still inserting while the test's tables are flushed deadlocks the flush.
    """
    used: list[GatewayServer] = []

    def start(**overrides: str) -> GatewayServer:
        server = gateway_servers(**overrides)
        used.append(server)
        return server

    yield start
    if used:
        wait_for_quiet_rows()


@pytest.fixture
def gateway_process(transactional_db, tmp_path) -> Iterator[Callable[..., GatewayServer]]:
    """``gateway_process(**env_overrides)`` starts a gateway of this test's own, a new process
    on every call (two calls with the same environment are two processes behind one database,
    as on two hosts). All are stopped when the test ends, before its rows are flushed, so a
    record still pending in one can never land in the next test."""
    servers: list[GatewayServer] = []

    def start(**overrides: str) -> GatewayServer:
        env = server_env(tmp_path, **overrides)
        server = GatewayServer(env, tmp_path / f"gateway-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(gateway_factory, transactional_db) -> GatewayServer:
    """The default gateway: anonymous allowed, no default upstream, 3 s upstream timeout."""
    return gateway_factory()


def wait_until(predicate: Callable[[], object], *, timeout: float = 5.0, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value (fails the test after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(interval)


def _row_counts() -> tuple[int, int]:
    # Imported here: this module is a pytest plugin, loaded before Django is set up.
    from experiments.models import ExperimentRequest
    from gateway.models import GatewayUsage

    return GatewayUsage.objects.count(), ExperimentRequest.objects.count()


#: Longer than the usage writer's batch linger (0.1 s): no row landed for this long means
#: none is on its way.
QUIET_SECONDS = 0.3


def wait_for_quiet_rows(*, timeout: float = 20.0) -> None:
    """Wait until no usage or attribution row has landed for ``QUIET_SECONDS``."""
    last = (_row_counts(), time.monotonic())

    def quiet() -> bool:
        nonlocal last
        counts = _row_counts()
        if counts != last[0]:
            last = (counts, time.monotonic())
        return time.monotonic() - last[1] >= QUIET_SECONDS

    wait_until(quiet, timeout=timeout)


def wait_for_rows(usage: int, attribution: int | None = None, *, timeout: float = 20.0) -> None:
    """Wait until the server's writer has landed at least these many rows, then check exact."""

    def landed() -> bool:
        usage_rows, attribution_rows = _row_counts()
        return usage_rows >= usage and (attribution is None or attribution_rows >= attribution)

    wait_until(landed, timeout=timeout)
    time.sleep(0.2)  # anything extra would land by now; the exact check below catches it
    got = _row_counts()
    assert got[0] == usage, got
    if attribution is not None:
        assert got[1] == attribution, got
