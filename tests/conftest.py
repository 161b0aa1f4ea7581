"""Shared fixtures. Tests run against the real PostgreSQL and Redis configured by
DATABASE_URL / REDIS_URL (SQLite and local memory when unset)."""

from __future__ import annotations

import contextlib
import os

import pytest
from django.core.cache import cache
from django.db import connection

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


@pytest.fixture
def canary_key() -> str:
    return CANARY_API_KEY


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


requires_postgres = pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").split(":", 1)[0] not in ("postgres", "postgresql", "pgsql"),
    reason="needs PostgreSQL (DATABASE_URL)",
)
