"""Shared fixtures. Tests run against the real PostgreSQL and Redis configured by
DATABASE_URL / REDIS_URL (SQLite and local memory when unset)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.cache import cache
from django.db import connection

from tests.faults import TcpProxy
from tests.gateway_server import GatewayServer, test_database_url
from tests.pytest_env import TEST_ENCRYPTION_KEY  # noqa: F401  (re-exported for tests)

CANARY_API_KEY = "sk-canary-7f3c9a1e5b2d4c6a8e0f1a3b5c7d9e1f"


@pytest.fixture(autouse=True)
def _clean_cache():
    # A test may point the cache at a closed port on purpose.
    with contextlib.suppress(Exception):
        cache.clear()
    yield
    with contextlib.suppress(Exception):
        cache.clear()


@pytest.fixture(autouse=True)
def _release_background_connections():
    """Leave no background thread holding a DB connection (it would block dropping the
    test database): the in-process usage writer, the routing reader's database thread, and
    asgiref's shared thread that runs sync_to_async code (async ORM) for tests driving
    async code."""
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections

    from gateway.routing import routing_database
    from gateway.usage import writer

    writer.stop(timeout=30)
    routing_database.close()
    asyncio.run(sync_to_async(connections.close_all)())


@pytest.fixture
def canary_key() -> str:
    return CANARY_API_KEY


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


requires_postgres = pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").split(":", 1)[0] not in ("postgres", "postgresql", "pgsql"),
    reason="needs PostgreSQL (DATABASE_URL)",
)


@pytest.fixture
def database_proxy(tcp_proxy) -> TcpProxy:
    """A TcpProxy to the test database's PostgreSQL (cut it to cut a gateway off)."""
    db = connection.settings_dict
    return tcp_proxy(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))


@pytest.fixture
def start_gateway(
    gateway_process, database_proxy: TcpProxy, tmp_path: Path
) -> Callable[..., GatewayServer]:
    """``start_gateway(**env)``: a gateway process reaching PostgreSQL through the proxy,
    spooling in one folder shared by every gateway the test starts (as on one host)."""

    def start(**overrides: str) -> GatewayServer:
        return gateway_process(
            DATABASE_URL=test_database_url(database_proxy.address),
            GATEWAY_SPOOL_DIR=str(tmp_path / "spool"),
            **overrides,
        )

    return start
