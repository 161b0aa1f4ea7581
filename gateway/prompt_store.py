"""Minimal content-addressed prompt store (local folder).

Placeholder with the agreed interface so the request browser can inflate
prompts; the prompts branch replaces this module (message-level dedup, S3).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

from django.conf import settings

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class PromptIntegrityError(Exception):
    """A stored blob whose bytes no longer hash to its name."""


class LocalPromptStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, sha256: str) -> Path:
        if not _SHA256_HEX.match(sha256):
            raise KeyError(sha256)
        return self.root / sha256

    def put(self, canonical: bytes) -> str:
        sha256 = hashlib.sha256(canonical).hexdigest()
        path = self._path(sha256)
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(canonical)
            tmp.replace(path)
        return sha256

    def get(self, sha256: str) -> bytes:
        try:
            blob = self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise PromptIntegrityError(f"prompt blob {sha256} does not match its hash")
        return blob

    def exists(self, sha256: str) -> bool:
        try:
            return self._path(sha256).exists()
        except KeyError:
            return False

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(KeyError):
            self._path(sha256).unlink(missing_ok=True)


def get_prompt_store() -> LocalPromptStore:
    return LocalPromptStore(settings.PROMPT_STORE_DIR)
