"""The durable local spool under the usage writer (SPEC §9): files only, no database.

Each gateway process appends one JSON line per usage record to its own *segment* file in
``GATEWAY_SPOOL_DIR`` before the client gets its response, and holds an exclusive
``flock`` on it while it lives. The page cache outlives a killed process, so a SIGKILL
loses no record of a completed response; ``fdatasync`` every
``GATEWAY_SPOOL_FSYNC_SECONDS`` bounds what a machine crash can lose to that interval.
A segment is deleted once every record in it is in the database. A segment whose lock
can be taken belongs to a dead process: any gateway sharing the folder adopts it and
replays it (the writer inserts by the records' own ids, so a replay counts once).

Lines: a record (``{"id": ..., ...}``, see ``gateway.usage``), or the prompt hash the
writer captured for a record (``{"prompt_of": id, "sha256": ..., "truncated": ...}``),
or the hash of a sampled answer it captured (``{"answer_of": id, "sha256": ...}``),
both written only when the record could not go to the database at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
#: A segment is created under this prefix and renamed once locked, so no other process
#: can adopt (and delete) a file its live owner has not locked yet.
CREATING_PREFIX = ".creating-"
QUARANTINE_NAME = "quarantine.jsonl"


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    #: Bytes in the file (as far as this process knows) and bytes not yet fdatasync'ed.
    size: int = 0
    unsynced: int = 0
    #: Record lines appended, and records the writer is done with (in the database,
    #: quarantined, or left on disk for replay).
    appended: int = 0
    processed: int = 0
    #: No more appends: the writer moved on to a newer segment (or adopted this one).
    retired: bool = False
    #: Some records in it are only on disk: insert them all from the file before deleting.
    needs_replay: bool = False

    @property
    def settled(self) -> bool:
        """Retired, and the writer is done with every record appended to it."""
        return self.retired and self.processed >= self.appended


class Spool:
    """This process's segments in one folder, and the folder's disk budget."""

    def __init__(self, directory: Path | str, max_bytes: int, fsync_seconds: float) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync_seconds = fsync_seconds
        self._closed = threading.Event()
        self.segments: list[Segment] = []
        self._current: Segment | None = None
        self._lock = threading.Lock()
        #: Bytes of the whole folder at the last scan, plus what this process appended since.
        self._bytes_used = 0
        #: Set when a write failed (disk full, folder gone): no room until a segment opens.
        self._write_failed = False

    # --- the event loop's side: one small write per record ------------------------

    @property
    def has_room(self) -> bool:
        return self._bytes_used < self.max_bytes and not self._write_failed

    @property
    def write_failed(self) -> bool:
        return self._write_failed

    def append(self, line: bytes) -> Segment | None:
        """Append one record line to the current segment; None if it could not be written."""
        with self._lock:
            segment = self._current
            if segment is None:
                return None
            try:
                os.write(segment.fd, line)
            except OSError as exc:
                self._write_failed = True
                logger.error("usage spool write failed (%s)", exc.strerror)
                return None
            segment.appended += 1
            segment.size += len(line)
            segment.unsynced += len(line)
            self._bytes_used += len(line)
            return segment

    # --- the writer thread's side --------------------------------------------------

    def open(self) -> None:
        """Start this process's first segment (on failure: no room until one opens) and the
        thread that syncs it: its own, so a writer blocked on the database never delays it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.rescan()
        except OSError as exc:
            self._write_failed = True
            logger.error("usage spool folder unusable (%s)", exc.strerror)
            return
        self.rotate()
        threading.Thread(
            target=self._sync_until_closed, name="usage-spool-sync", daemon=True
        ).start()

    def _sync_until_closed(self) -> None:
        while not self._closed.wait(self.fsync_seconds):
            self.sync()

    def rotate(self) -> Segment | None:
        """Retire the current segment and continue in a new one; returns the retired one."""
        try:
            fresh = self._create_segment()
        except OSError as exc:
            self._write_failed = True
            logger.error("usage spool segment could not be created (%s)", exc.strerror)
            return None
        with self._lock:
            retired, self._current = self._current, fresh
            self.segments.append(fresh)
            self._write_failed = False
            if retired is not None:
                retired.retired = True
        return retired

    def retire_current(self) -> None:
        """No more appends (shutdown): later records only reach the database from memory."""
        with self._lock:
            if self._current is not None:
                self._current.retired = True
            self._current = None

    @property
    def current(self) -> Segment | None:
        return self._current

    def _create_segment(self) -> Segment:
        name = f"{os.getpid()}-{time.time_ns()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"
        creating = self.directory / (CREATING_PREFIX + name)
        fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = self.directory / name
            os.rename(creating, path)
            self._sync_directory()
        except BaseException:
            os.close(fd)
            creating.unlink(missing_ok=True)
            raise
        return Segment(path=path, fd=fd)

    def append_to(self, segment: Segment, line: bytes) -> bool:
        """Append a line (a prompt hash) to one of this process's open segments."""
        with self._lock:
            try:
                os.write(segment.fd, line)
            except OSError as exc:
                logger.error("usage spool write failed (%s)", exc.strerror)
                return False
            segment.size += len(line)
            segment.unsynced += len(line)
            self._bytes_used += len(line)
            return True

    def sync(self) -> None:
        """fdatasync every segment with unsynced lines (the machine-crash bound)."""
        with self._lock:
            dirty = [segment for segment in self.segments if segment.unsynced]
            for segment in dirty:
                segment.unsynced = 0
        for segment in dirty:
            try:
                os.fdatasync(segment.fd)
            except OSError as exc:
                if segment in self.segments:  # not deleted meanwhile (its fd closed)
                    logger.error("usage spool fsync failed (%s)", exc.strerror)

    def delete(self, segment: Segment) -> None:
        """Remove a segment whose records are all in the database (unlink, then unlock)."""
        with self._lock:
            self.segments.remove(segment)
            if self._current is segment:
                self._current = None
            self._bytes_used = max(self._bytes_used - segment.size, 0)
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)

    def release_all(self) -> None:
        """Sync and unlock every remaining segment (left for whichever process adopts it)."""
        self._closed.set()
        self.retire_current()
        self.sync()
        with self._lock:
            segments, self.segments = self.segments, []
        for segment in segments:
            os.close(segment.fd)

    def adopt_orphans(self) -> list[Segment]:
        """Lock and take over the segments of processes that died (their lock is free)."""
        adopted = []
        owned = {segment.path.name for segment in self.segments}
        for path in sorted(self.directory.glob("*" + SEGMENT_SUFFIX)):
            if path.name in owned or path.name == QUARANTINE_NAME:
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            except OSError:
                continue  # deleted meanwhile by its owner or another adopter
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The file we locked must still be the one at that name: its owner or
                # another adopter may have deleted it between our open and our lock.
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except OSError:
                os.close(fd)
                continue
            if not same:
                os.close(fd)
                continue
            segment = Segment(
                path=path,
                fd=fd,
                size=os.fstat(fd).st_size,
                retired=True,
                needs_replay=True,
            )
            with self._lock:
                self.segments.append(segment)
            adopted.append(segment)
        return adopted

    def rescan(self) -> None:
        """Recount the folder's bytes (other processes on this host share the budget)."""
        total = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(SEGMENT_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        self._bytes_used = total

    def quarantine(self, entries: list[dict[str, Any]]) -> None:
        """Keep records the database refused, for inspection (one JSON line each)."""
        payload = b"".join(json_line(entry) for entry in entries)
        fd = os.open(
            self.directory / QUARANTINE_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        try:
            os.write(fd, payload)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._bytes_used += len(payload)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def json_line(entry: dict[str, Any]) -> bytes:
    # ASCII only: a lone surrogate from a client survives as an escape, never as bad bytes.
    return json.dumps(entry, separators=(",", ":")).encode("ascii") + b"\n"


@dataclass
class SegmentContents:
    records: list[dict[str, Any]]
    prompts: dict[str, tuple[str, bool]]
    unreadable: list[str]
    answers: dict[str, str] = field(default_factory=dict)


def read_segment(path: Path) -> SegmentContents:
    """The record lines, the captured prompt hashes by record id, and unreadable lines.

    An unreadable line can only be the last one, cut short by a machine crash.
    """
    records: list[dict[str, Any]] = []
    prompts: dict[str, tuple[str, bool]] = {}
    answers: dict[str, str] = {}
    unreadable: list[str] = []
    with open(path, "rb") as handle:
        for raw in _lines(handle):
            try:
                line = json.loads(raw)
            except ValueError:
                unreadable.append(raw.decode("ascii", "replace"))
                continue
            if "prompt_of" in line:
                prompts[line["prompt_of"]] = (line["sha256"], bool(line["truncated"]))
            elif "answer_of" in line:
                answers[line["answer_of"]] = line["sha256"]
            else:
                records.append(line)
    return SegmentContents(records, prompts, unreadable, answers)


def _lines(handle) -> Iterator[bytes]:
    for raw in handle:
        raw = raw.strip()
        if raw:
            yield raw
