"""Content-addressed prompt store with message-level deduplication (SPEC §9).

The attribution row keeps ``request_body_sha256``: the SHA-256 of the canonical
transformed request body (after truncation). ``get(sha256)`` returns exactly
those bytes and verifies the hash, whatever the layout underneath.

Why message-level: an agent session resends its whole growing conversation on
every turn, so storing each body whole costs roughly the square of the session
length. Each message (and a large system prompt, instructions or tool list) is
stored once as a *part*; the request is a small *manifest* that splices parts
between the literal bytes around them.

Layout (one key space, two namespaces, same on the local folder and on S3)::

    r/<sha[:2]>/<sha>   request blob, named by the row's hash (the canonical body)
    p/<sha[:2]>/<sha>   part blob, named by the SHA-256 of its own bytes
    a/<sha[:2]>/<sha>   answer blob (``W`` + the canonical answer document, see
                        ``experiments.prompts.answers``), named by the row's response hash

A request blob starts with one type byte:

* ``W`` + the canonical bytes: stored whole (no messages, or not splittable).
* ``M`` + version byte 1 + segments: a manifest. Segments are
  ``0x01 <varint n> <n literal bytes>`` or ``0x02 <varint k> <k x 32-byte part
  digests>`` (the parts' bytes joined by ``,``). Rebuilding concatenates the
  segments.

Parts are byte *slices* of the canonical body, cut at the boundaries of
top-level values found by a JSON scanner, never re-serialized: the rebuilt
bytes are the original bytes by construction, and a truncated body (cut inside
JSON) still dedups the messages that fit before the cut. Lists split per element:
``messages`` (chat, where the system prompt is a message; Anthropic Messages)
and ``input`` (Responses). Values kept as one part when large: ``system``
(Anthropic, string or list), ``instructions`` and ``input`` as a string
(Responses), ``tools``/``functions``.

Garbage collection (``experiments.prompts.maintenance``) relies on three rules here:
a request blob and a part are written before anything references them (parts,
then manifest, then the row); reusing an existing blob refreshes its age
("touch") so a blob GC saw as an old orphan is young again once referenced; and
a part this process touched less than ``PART_TOUCH_TTL_SECONDS`` ago is not
touched again (saves one S3 round trip per message per request), which is safe
because GC refuses a grace period shorter than twice that TTL.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings

from experiments.models import PROMPT_HASH_FAILED

logger = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 4 * 1024 * 1024

REQUEST_NAMESPACE = "r"
PART_NAMESPACE = "p"
ANSWER_NAMESPACE = "a"
WHOLE_MARKER = b"W"
MANIFEST_MARKER = b"M"
MANIFEST_VERSION = 1
SEGMENT_LITERAL = 0x01
SEGMENT_PARTS = 0x02
DIGEST_BYTES = 32

#: Top-level keys whose list value is split into one part per element.
PART_LIST_KEYS = frozenset({"messages", "input"})
#: Top-level keys whose value is one part when its bytes reach MIN_VALUE_PART_BYTES.
PART_VALUE_KEYS = frozenset({"system", "instructions", "input", "tools", "functions"})
#: Below this, a reference (32 bytes) plus a blob costs more than inlining.
MIN_VALUE_PART_BYTES = 256
#: A part this process wrote or touched this recently is not touched again.
PART_TOUCH_TTL_SECONDS = 300
_PART_CACHE_MAX_ENTRIES = 200_000

_HEX = frozenset("0123456789abcdef")


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


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(ch in _HEX for ch in value)


def blob_key(namespace: str, sha256: str) -> str:
    if not is_sha256_hex(sha256):
        raise KeyError(sha256)
    return f"{namespace}/{sha256[:2]}/{sha256}"


# --- Backends: dumb byte storage with ages -----------------------------------


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime

    @property
    def namespace(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def sha256(self) -> str:
        return self.key.rsplit("/", 1)[-1]


class BlobBackend(Protocol):
    def read(self, key: str) -> bytes: ...  # KeyError when absent
    def write(self, key: str, content: bytes) -> None: ...
    def touch(self, key: str) -> bool: ...  # refresh the age; False when absent
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def modified(self, key: str) -> datetime | None: ...
    def list(self, namespace: str) -> Iterator[BlobInfo]: ...


class LocalBlobBackend:
    """Files under a local folder (the default). Writes are write-then-rename."""

    TEMP_PREFIX = ".tmp-"

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def write(self, key: str, content: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a reader never sees half a blob.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=self.TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            return False
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def modified(self, key: str) -> datetime | None:
        try:
            return datetime.fromtimestamp(self._path(key).stat().st_mtime, UTC)
        except FileNotFoundError:
            return None

    def list(self, namespace: str) -> Iterator[BlobInfo]:
        """Blobs of a namespace, plus leftover temp files of crashed writes (GC removes them)."""
        base = self.root / namespace
        if not base.is_dir():
            return
        for shard in sorted(base.iterdir()):
            if not shard.is_dir():
                continue
            with os.scandir(shard) as entries:
                for entry in entries:
                    if not entry.is_file():
                        continue
                    if not (is_sha256_hex(entry.name) or entry.name.startswith(self.TEMP_PREFIX)):
                        continue  # not ours: never listed, never collected
                    stat = entry.stat()
                    yield BlobInfo(
                        key=f"{namespace}/{shard.name}/{entry.name}",
                        size=stat.st_size,
                        modified=datetime.fromtimestamp(stat.st_mtime, UTC),
                    )


class S3BlobBackend:
    """Objects in an S3-compatible bucket (e.g. Cloudflare R2) through django-storages."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        prefix: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ):
        # Imported here: the s3 extra is optional.
        from botocore.config import Config
        from storages.backends.s3 import S3Storage

        if not bucket:
            raise ValueError("PROMPT_STORE_S3_BUCKET is required for the s3 prompt store")
        self.location = prefix.strip("/")
        self.storage = S3Storage(
            bucket_name=bucket,
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            access_key=access_key_id or None,
            secret_key=secret_access_key or None,
            location=self.location,
            file_overwrite=True,
            default_acl=None,
            querystring_auth=False,
            client_config=Config(
                signature_version="s3v4",
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
            ),
        )

    @property
    def _client(self) -> Any:
        # The storage keeps one boto3 resource per thread; clients are thread-safe.
        return self.storage.connection.meta.client

    def _object_key(self, key: str) -> str:
        return f"{self.location}/{key}" if self.location else key

    @staticmethod
    def _is_missing(error: Exception) -> bool:
        response = getattr(error, "response", None) or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return status == 404 or code in {"NoSuchKey", "404", "NotFound"}

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(
                Bucket=self.storage.bucket_name, Key=self._object_key(key)
            )
        except ClientError as error:
            if self._is_missing(error):
                raise KeyError(key) from None
            raise
        return response["Body"].read()

    def write(self, key: str, content: bytes) -> None:
        from django.core.files.base import ContentFile

        # S3 PUTs are atomic: a reader sees the old object, the new one, or none.
        self.storage.save(key, ContentFile(content))

    def touch(self, key: str) -> bool:
        """Refresh LastModified with a server-side copy onto itself (no bytes move here)."""
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            self._client.copy_object(
                Bucket=self.storage.bucket_name,
                Key=object_key,
                CopySource={"Bucket": self.storage.bucket_name, "Key": object_key},
                MetadataDirective="REPLACE",
                Metadata={"touched": datetime.now(UTC).isoformat()},
            )
        except ClientError as error:
            if self._is_missing(error):
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        return self.storage.exists(key)

    def delete(self, key: str) -> None:
        self.storage.delete(key)

    def modified(self, key: str) -> datetime | None:
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(
                Bucket=self.storage.bucket_name, Key=self._object_key(key)
            )
        except ClientError as error:
            if self._is_missing(error):
                return None
            raise
        return head["LastModified"]

    def list(self, namespace: str) -> Iterator[BlobInfo]:
        strip = len(self.location) + 1 if self.location else 0
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=self.storage.bucket_name, Prefix=self._object_key(f"{namespace}/")
        ):
            for item in page.get("Contents", []):
                key = item["Key"][strip:]
                if not is_sha256_hex(key.rsplit("/", 1)[-1]):
                    continue
                yield BlobInfo(key=key, size=item["Size"], modified=item["LastModified"])


# --- Manifests ---------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buffer: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


_decoder = json.JSONDecoder()


def _skip_value(text: str, pos: int) -> int:
    """End of the JSON value starting at ``pos``; raises ValueError/IndexError if cut short."""
    _, end = _decoder.raw_decode(text, pos)
    return end


def part_runs(text: str) -> list[list[tuple[int, int]]]:
    """Spans of the parts of a canonical body, grouped in runs separated only by ``,``.

    Scans top-level values only. A body cut short (truncated) yields the parts
    that end before the cut; anything unexpected simply yields fewer parts.
    """
    runs: list[list[tuple[int, int]]] = []
    if not text.startswith("{"):
        return runs
    pos = 1
    try:
        while text[pos] != "}":
            key, pos = _decoder.raw_decode(text, pos)
            if not isinstance(key, str) or text[pos] != ":":
                return runs
            pos += 1
            if key in PART_LIST_KEYS and text[pos] == "[":
                pos += 1
                run: list[tuple[int, int]] = []
                runs.append(run)
                while text[pos] != "]":
                    start = pos
                    pos = _skip_value(text, pos)
                    run.append((start, pos))
                    if text[pos] == ",":
                        pos += 1
                pos += 1
            else:
                start = pos
                pos = _skip_value(text, pos)
                if key in PART_VALUE_KEYS and pos - start >= MIN_VALUE_PART_BYTES:
                    runs.append([(start, pos)])
            if text[pos] == ",":
                pos += 1
    except (ValueError, IndexError):
        pass  # truncated body: the spans collected so far are complete values
    return [run for run in runs if run]


def split_canonical(canonical: bytes) -> tuple[bytes, dict[str, bytes]] | None:
    """The manifest and the parts (by hex digest) of a canonical body, or None to store it whole."""
    try:
        text = canonical.decode("utf-8")
    except UnicodeDecodeError:
        return None
    runs = part_runs(text)
    if not runs:
        return None
    manifest = bytearray(MANIFEST_MARKER + bytes([MANIFEST_VERSION]))
    parts: dict[str, bytes] = {}
    rebuilt = bytearray()
    cursor = 0

    def literal(fragment: str) -> None:
        if fragment:
            encoded = fragment.encode("utf-8")
            manifest.append(SEGMENT_LITERAL)
            manifest.extend(_varint(len(encoded)))
            manifest.extend(encoded)
            rebuilt.extend(encoded)

    for run in runs:
        literal(text[cursor : run[0][0]])
        manifest.append(SEGMENT_PARTS)
        manifest.extend(_varint(len(run)))
        for index, (start, end) in enumerate(run):
            part = text[start:end].encode("utf-8")
            digest = hashlib.sha256(part)
            parts[digest.hexdigest()] = part
            manifest.extend(digest.digest())
            rebuilt.extend(b"," + part if index else part)
        cursor = run[-1][1]
    literal(text[cursor:])
    # Cheap insurance: never store a manifest that would not rebuild these bytes.
    if bytes(rebuilt) != canonical:
        return None
    return bytes(manifest), parts


def manifest_segments(manifest: bytes) -> Iterator[bytes | list[str]]:
    """Literal bytes or lists of part digests, in order. ValueError if malformed."""
    if manifest[:1] != MANIFEST_MARKER or manifest[1:2] != bytes([MANIFEST_VERSION]):
        raise ValueError("not a version 1 manifest")
    pos = 2
    try:
        while pos < len(manifest):
            kind = manifest[pos]
            count, pos = _read_varint(manifest, pos + 1)
            if kind == SEGMENT_LITERAL:
                end = pos + count
                if end > len(manifest):
                    raise ValueError("literal runs past the end")
                yield manifest[pos:end]
                pos = end
            elif kind == SEGMENT_PARTS:
                end = pos + count * DIGEST_BYTES
                if end > len(manifest):
                    raise ValueError("part list runs past the end")
                yield [manifest[i : i + DIGEST_BYTES].hex() for i in range(pos, end, DIGEST_BYTES)]
                pos = end
            else:
                raise ValueError(f"unknown segment type {kind}")
    except IndexError:
        raise ValueError("manifest cut short") from None


def manifest_part_digests(request_blob: bytes) -> set[str]:
    """Digests of the parts a request blob references (empty for a whole blob)."""
    if request_blob[:1] != MANIFEST_MARKER:
        return set()
    digests: set[str] = set()
    for segment in manifest_segments(request_blob):
        if isinstance(segment, list):
            digests.update(segment)
    return digests


# --- The store ---------------------------------------------------------------


class PromptStore:
    """put/get/exists/delete by the SHA-256 of the canonical body, over any BlobBackend."""

    def __init__(self, backend: BlobBackend, *, dedupe_messages: bool = True):
        self.backend = backend
        self.dedupe_messages = dedupe_messages
        self._touched_parts: dict[str, float] = {}
        self._lock = threading.Lock()

    def put(self, canonical: bytes) -> str:
        digest = sha256_hex(canonical)
        request_key = blob_key(REQUEST_NAMESPACE, digest)
        # Exists → skip, but refresh its age so a concurrent GC does not take it.
        if self.backend.touch(request_key):
            return digest
        split = split_canonical(canonical) if self.dedupe_messages else None
        if split is None:
            self.backend.write(request_key, WHOLE_MARKER + canonical)
            return digest
        manifest, parts = split
        stored_parts = []
        for part_digest, part in parts.items():
            if self._recently_touched(part_digest):
                continue
            part_key = blob_key(PART_NAMESPACE, part_digest)
            if not self.backend.touch(part_key):
                self.backend.write(part_key, part)
            stored_parts.append(part_digest)
        # Parts first, manifest last: a manifest never points at a missing part.
        self.backend.write(request_key, manifest)
        self._remember_touched(stored_parts)
        return digest

    def get(self, sha256: str) -> bytes:
        """The exact canonical bytes; KeyError if absent, corrupt or not matching the hash."""
        blob = self.backend.read(blob_key(REQUEST_NAMESPACE, sha256))
        if blob[:1] == WHOLE_MARKER:
            canonical = blob[1:]
        elif blob[:1] == MANIFEST_MARKER:
            canonical = self._rebuild(sha256, blob)
        else:
            raise KeyError(f"{sha256} (unknown blob type)")
        if sha256_hex(canonical) != sha256:
            raise KeyError(f"{sha256} (content does not match its hash)")
        return canonical

    def _rebuild(self, sha256: str, manifest: bytes) -> bytes:
        try:
            segments = list(manifest_segments(manifest))
        except ValueError as error:
            raise KeyError(f"{sha256} (corrupt manifest: {error})") from None
        out = io.BytesIO()
        for segment in segments:
            if isinstance(segment, bytes):
                out.write(segment)
                continue
            for index, part_digest in enumerate(segment):
                try:
                    part = self.backend.read(blob_key(PART_NAMESPACE, part_digest))
                except KeyError:
                    raise KeyError(f"{sha256} (part {part_digest} is missing)") from None
                if sha256_hex(part) != part_digest:
                    raise KeyError(f"{sha256} (part {part_digest} is corrupt)")
                if index:
                    out.write(b",")
                out.write(part)
        return out.getvalue()

    def exists(self, sha256: str) -> bool:
        try:
            return self.backend.exists(blob_key(REQUEST_NAMESPACE, sha256))
        except KeyError:
            return False

    # Answers: whole blobs in their own namespace, written once per content like prompts
    # (exists -> touch, so GC sees a reused answer as young again).

    def put_answer(self, canonical: bytes) -> str:
        digest = sha256_hex(canonical)
        key = blob_key(ANSWER_NAMESPACE, digest)
        if not self.backend.touch(key):
            self.backend.write(key, WHOLE_MARKER + canonical)
        return digest

    def get_answer(self, sha256: str) -> bytes:
        """The exact canonical answer bytes; KeyError if absent, corrupt or not matching."""
        blob = self.backend.read(blob_key(ANSWER_NAMESPACE, sha256))
        if blob[:1] != WHOLE_MARKER or sha256_hex(blob[1:]) != sha256:
            raise KeyError(f"{sha256} (answer does not match its hash)")
        return blob[1:]

    def answer_exists(self, sha256: str) -> bool:
        try:
            return self.backend.exists(blob_key(ANSWER_NAMESPACE, sha256))
        except KeyError:
            return False

    def delete(self, sha256: str) -> None:
        """Delete the request blob; its parts, possibly shared, are left to GC."""
        self.backend.delete(blob_key(REQUEST_NAMESPACE, sha256))

    def _recently_touched(self, part_digest: str) -> bool:
        touched = self._touched_parts.get(part_digest)
        return touched is not None and time.monotonic() - touched < PART_TOUCH_TTL_SECONDS

    def _remember_touched(self, part_digests: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._touched_parts) > _PART_CACHE_MAX_ENTRIES:
                self._touched_parts.clear()
            for part_digest in part_digests:
                self._touched_parts[part_digest] = now


class LocalPromptStore(PromptStore):
    def __init__(self, root: Path | str, *, dedupe_messages: bool = True):
        super().__init__(LocalBlobBackend(root), dedupe_messages=dedupe_messages)

    @property
    def root(self) -> Path:
        return self.backend.root


class S3PromptStore(PromptStore):
    def __init__(self, *, dedupe_messages: bool = True, **backend_options: Any):
        super().__init__(S3BlobBackend(**backend_options), dedupe_messages=dedupe_messages)


@lru_cache(maxsize=4)
def _store_for(backend: str, options: tuple[tuple[str, Any], ...]) -> PromptStore:
    if backend == "local":
        return LocalPromptStore(dict(options)["root"])
    if backend == "s3":
        return S3PromptStore(**dict(options))
    raise ValueError(f"PROMPT_STORE_BACKEND must be 'local' or 's3', not {backend!r}")


def get_prompt_store() -> PromptStore:
    """The configured store; one per process and configuration (the S3 client is costly)."""
    backend = settings.PROMPT_STORE_BACKEND
    if backend == "s3":
        options = (
            ("bucket", settings.PROMPT_STORE_S3_BUCKET),
            ("endpoint_url", settings.PROMPT_STORE_S3_ENDPOINT_URL),
            ("region", settings.PROMPT_STORE_S3_REGION),
            ("access_key_id", settings.PROMPT_STORE_S3_ACCESS_KEY_ID),
            ("secret_access_key", settings.PROMPT_STORE_S3_SECRET_ACCESS_KEY),
            ("prefix", settings.PROMPT_STORE_S3_PREFIX),
        )
    else:
        options = (("root", str(settings.PROMPT_STORE_DIR)),)
    return _store_for(backend, options)


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
