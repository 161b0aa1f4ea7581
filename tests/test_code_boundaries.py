"""The architecture's boundaries, read from the source (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# That experiments never imports gateway is checked in tests/test_layering.py.


#: Django admin internals a ModelAdmin must not reach into, and request attributes of our own.
PRIVATE_ADMIN = ("_registry", "_changeform_view", "_create_formsets", "_should_delete_form")


@pytest.mark.parametrize("path", [ROOT / "experiments" / "admin.py", ROOT / "gateway" / "admin.py"])
def test_the_admin_uses_no_private_admin_internals_and_stashes_nothing_on_the_request(path):
    tree = ast.parse(path.read_text())
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ADMIN
    ]
    stashed = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "request"
        and node.attr.startswith("_")
    ]
    assert (private, stashed) == ([], [])


def test_a_gateway_process_does_not_load_the_report_statistics_libraries(tmp_path):
    """statsmodels brings pandas (~100 MB resident): only a report page may load it, never
    every gateway worker at startup (the admin, and so the reports modules, load with it)."""
    import os
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from config.asgi import application\n"
        "import gateway.views, gateway.usage, experiments.admin, experiments.report_views\n"
        "heavy = ('numpy', 'scipy', 'statsmodels', 'pandas')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {
        **os.environ,
        "SECRET_KEY": "x" * 50 + "-boundary-test-not-the-development-key",
        "BYOK_ENCRYPTION_KEY_FILE": str(tmp_path / "missing.key"),
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", probe],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
