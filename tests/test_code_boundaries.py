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
