"""Pytest plugin (loaded with ``-p tests.upstream``): the demo partner upstream on loopback.

One real uvicorn server per session (two with the keyed variant), in a background thread on
an ephemeral port; the function-scoped fixtures clear its request record before each test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from gateway.demo_upstream import make_app

PARTNER_API_KEY = "sk-partner-demo-upstream-key-4c1d"
STARTUP_TIMEOUT_SECONDS = 10


class RunningUpstream:
    """A partner upstream (an ASGI app) served by uvicorn in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            server_header=False,
            lifespan="off",
            # A request sleeping on a "timeout" fault must not hold up the end of the session.
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="upstream", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("demo upstream did not start")
            time.sleep(0.01)
        self.port: int = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=STARTUP_TIMEOUT_SECONDS)


class UpstreamHandle:
    """What a test sees: where the upstream listens and what it received."""

    def __init__(self, running: RunningUpstream) -> None:
        self._running = running
        self.host = "127.0.0.1"
        self.port = running.port
        self.host_port = f"{self.host}:{self.port}"
        self.base_url = f"http://{self.host_port}/v1"
        self.expected_api_key = running.app.expected_api_key

    @property
    def received(self) -> list[dict[str, Any]]:
        return self._running.app.received

    def clear(self) -> None:
        self._running.app.received.clear()


def _serve(expected_api_key: str | None) -> Iterator[RunningUpstream]:
    running = RunningUpstream(make_app(expected_api_key=expected_api_key))
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def _upstream_server() -> Iterator[RunningUpstream]:
    yield from _serve(None)


@pytest.fixture(scope="session")
def _keyed_upstream_server() -> Iterator[RunningUpstream]:
    yield from _serve(PARTNER_API_KEY)


@pytest.fixture
def upstream(_upstream_server: RunningUpstream) -> UpstreamHandle:
    """The demo upstream accepting any credentials, with an empty request record."""
    handle = UpstreamHandle(_upstream_server)
    handle.clear()
    return handle


@pytest.fixture
def keyed_upstream(_keyed_upstream_server: RunningUpstream) -> UpstreamHandle:
    """The demo upstream that answers 401 unless given ``PARTNER_API_KEY``."""
    handle = UpstreamHandle(_keyed_upstream_server)
    handle.clear()
    return handle
