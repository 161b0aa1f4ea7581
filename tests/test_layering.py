"""Dependencies run one way (ARCHITECTURE.md): ``gateway`` imports ``experiments``;
``experiments`` never imports ``gateway`` (the only edge back is the attribution row's
foreign key to the usage row, named by app label)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


EXPERIMENTS_FILES = sorted((ROOT / "experiments").rglob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiments_never_imports_gateway(path):
    offending = {m for m in imported_modules(path) if m == "gateway" or m.startswith("gateway.")}
    assert not offending, f"{path.relative_to(ROOT)} imports {sorted(offending)}"


def test_the_gateway_captures_prompts_through_the_experiments_prompt_store():
    assert "experiments.prompts.store" in imported_modules(ROOT / "gateway" / "usage.py")
    assert not (ROOT / "gateway" / "prompt_store.py").exists()


def test_the_gateway_captures_answers_through_the_experiments_prompt_store():
    assert "experiments.prompts.answers" in imported_modules(ROOT / "gateway" / "usage.py")
    assert "experiments.prompts.answers" in imported_modules(ROOT / "gateway" / "views.py")


def test_report_pages_need_no_url_ordering_trick():
    assert not (ROOT / "experiments" / "report_urls.py").exists()
    # The admin's own URLs serve the report pages: the URLconf includes nothing of experiments.
    assert "experiments." not in (ROOT / "config" / "urls.py").read_text(encoding="utf-8")
