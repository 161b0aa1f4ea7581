"""Content-addressed prompt store (SPEC §9).

The attribution row keeps ``request_body_sha256``: the SHA-256 of the canonical
transformed request body (after truncation). ``get(sha256)`` returns exactly
those bytes and verifies the hash. Blobs are written once per unique content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings

from experiments.models import PROMPT_HASH_FAILED

logger = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 4 * 1024 * 1024


def truncate_utf8(data: bytes, limit: int = MAX_PROMPT_BYTES) -> tuple[bytes, bool]:
    """Cut UTF-8 ``data`` to at most ``limit`` bytes without splitting a code point."""
    if len(data) <= limit:
        return data, False
    cut = limit
    # A continuation byte (10xxxxxx) at the cut means a code point straddles it.
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut], True


def canonical_body(body: Any) -> tuple[bytes, bool]:
    """The canonical bytes of a transformed request body, and whether they were truncated."""
    encoded = json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(
        "utf-8"
    )
    return truncate_utf8(encoded)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PromptStore(Protocol):
    def put(self, canonical: bytes) -> str: ...
    def get(self, sha256: str) -> bytes: ...
    def exists(self, sha256: str) -> bool: ...
    def delete(self, sha256: str) -> None: ...


class LocalPromptStore:
    """Blobs as files named by their hash under a local folder (the default)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(ch not in "0123456789abcdef" for ch in sha256):
            raise KeyError(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, canonical: bytes) -> str:
        digest = sha256_hex(canonical)
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a reader never sees half a blob.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(canonical)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            data = self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None
        if sha256_hex(data) != sha256:
            raise KeyError(f"{sha256} (content does not match its hash)")
        return data

    def exists(self, sha256: str) -> bool:
        try:
            return self._path(sha256).exists()
        except KeyError:
            return False

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)


def get_prompt_store() -> PromptStore:
    return LocalPromptStore(settings.PROMPT_STORE_DIR)


def capture_prompt(body: Any, *, store: PromptStore | None = None) -> tuple[str, bool]:
    """Store a transformed body; return (sha256 or ``__failed__``, was_truncated). Never raises."""
    try:
        canonical, truncated = canonical_body(body)
    except (TypeError, ValueError):
        return PROMPT_HASH_FAILED, False
    try:
        return (store or get_prompt_store()).put(canonical), truncated
    except Exception as exc:
        logger.warning("prompt capture failed: %s", type(exc).__name__)
        return PROMPT_HASH_FAILED, truncated
