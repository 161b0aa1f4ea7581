"""Settings a deployment behind PgBouncer needs, read from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def server_side_cursors_disabled(**env: str) -> str:
    script = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.DATABASES['default']['DISABLE_SERVER_SIDE_CURSORS'])"
    )
    environment = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_DISABLE_SERVER_SIDE_CURSORS"},
        "DJANGO_SETTINGS_MODULE": "config.settings",
        **env,
    }
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout.strip()


@pytest.mark.parametrize(("value", "expected"), [(None, "False"), ("true", "True")])
def test_server_side_cursors_can_be_switched_off_for_pgbouncer_transaction_pooling(value, expected):
    env = {} if value is None else {"DATABASE_DISABLE_SERVER_SIDE_CURSORS": value}
    assert server_side_cursors_disabled(**env) == expected
