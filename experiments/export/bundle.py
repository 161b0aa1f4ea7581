"""A provider-safe export bundle: one folder, written whole or not at all.

``report.json``
    The report exactly as ``experiment_report --format json`` builds it
    (``report_record``), with each checkpoint named by its version id and a label
    (``slot-a v2``) instead of its upstream model id (``internal_id``).
``samples.jsonl`` (with ``--samples N``)
    Up to N request/answer pairs per checkpoint, chosen deterministically from the
    seed in the manifest, each text passed through the redactor.
``manifest.json``
    The experiment, the window, the checkpoints, the sampling seed and method, what
    the redactor replaced (counts by kind) and the SHA-256 and size of every other file.

What never enters a bundle: user ids, machine ids, IP addresses, subject pseudonyms,
client request ids, usage ids, partner keys (plain or encrypted), key fingerprints,
and anything of the upstream configuration (base URLs, upstream model ids, extra body
fields): a bundle goes to one provider and may cover another provider's checkpoints.

The folder is built in a hidden sibling ``.<name>.*.partial`` and renamed into place
once complete; on any failure the partial folder is removed.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import json
import os
import re
import shutil
import tempfile
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

from experiments.export.redact import Redactor
from experiments.management.commands.experiment_report import report_record
from experiments.models import PROMPT_HASH_DELETED, PROMPT_HASH_FAILED, ExperimentRequest
from experiments.prompts.store import get_prompt_store, is_sha256_hex
from experiments.reports.report import ExperimentReport
from experiments.selectors import version_upstreams

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
SAMPLES = "samples.jsonl"
#: At most this many samples per checkpoint: a bundle is evidence, not a data dump.
MAX_SAMPLES = 10_000
#: Rows read per round trip while choosing samples.
SCAN_CHUNK = 5_000
#: Chosen requests' details read per query.
DETAIL_CHUNK = 1_000
SAMPLING_METHOD = (
    "per checkpoint, among successful requests in the window whose prompt is kept (not "
    "wiped, not failed), the N with the smallest BLAKE2b-64 of the request's id keyed "
    "with the seed; requests with a captured answer first"
)

#: (phase, done, total), as experiments.management.progress draws it.
Progress = Callable[[str, int, int], None]


class ExportError(Exception):
    """The export could not be written; nothing was. The message is safe to show."""


def tool_version() -> str:
    try:
        return metadata.version("model-experiments")
    except metadata.PackageNotFoundError:
        pyproject = Path(settings.BASE_DIR) / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def answers_captured() -> bool:
    """Whether attribution rows can point at a captured answer in the prompt store
    (the ``response_sha256`` column). Exports work with and without it."""
    return any(f.name == "response_sha256" for f in ExperimentRequest._meta.get_fields())


# --- checkpoints: how the bundle names them --------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    version_id: uuid.UUID
    slot: str
    number: int
    #: What the provider reads: "slot-a v2".
    label: str
    upstream: dict

    @property
    def internal_id(self) -> str:
        return str(self.upstream.get("internal_id") or "")

    @property
    def host(self) -> str:
        try:
            return urlsplit(str(self.upstream.get("base_url") or "")).hostname or ""
        except ValueError:
            return ""


def checkpoint_refs(report: ExperimentReport, record: dict) -> dict[uuid.UUID, CheckpointRef]:
    """Every checkpoint of the report, numbered per slot: the report's own
    ``version_number`` where it has one, else its place in the slot's history."""
    upstreams = version_upstreams(report.experiment)
    refs = {}
    for slot, slot_record in zip(report.slots, record["slots"], strict=True):
        for place, (stats, entry) in enumerate(
            zip(slot.checkpoints, slot_record["checkpoints"], strict=True), start=1
        ):
            number = entry.get("version_number") or place
            refs[stats.version_id] = CheckpointRef(
                version_id=stats.version_id,
                slot=slot.label,
                number=number,
                label=entry.get("label") or f"{slot.label} v{number}",
                upstream=upstreams.get(stats.version_id, {}),
            )
    return refs


def identifier_literals(refs: dict[uuid.UUID, CheckpointRef]) -> dict[str, str]:
    """What names an upstream (model ids, hosts), with the placeholder that replaces it."""
    literals = {ref.host: "[upstream-host]" for ref in refs.values() if ref.host}
    literals.update((ref.internal_id, "[checkpoint]") for ref in refs.values() if ref.internal_id)
    return literals


#: Checkpoint fields the report may carry that name a checkpoint to a person; copied
#: into the manifest when present.
CHECKPOINT_NAME_FIELDS = ("version_number", "version_label", "key_rotated", "key_rotation")


def provider_safe_report(
    record: dict, report: ExperimentReport, refs: dict[uuid.UUID, CheckpointRef]
) -> dict:
    """``report_record``'s output with checkpoints named by version id and label, not by
    upstream model id; any upstream identifier left in a string becomes a placeholder."""
    record = copy.deepcopy(record)
    entries = [entry for slot in record["slots"] for entry in slot["checkpoints"]]
    for entry, stats in zip(entries, report.checkpoints, strict=True):
        entry.pop("internal_id", None)
        entry.setdefault("version_id", str(stats.version_id))
        entry.setdefault("label", refs[stats.version_id].label)
    # The control and each comparison name checkpoints by version id and label only.
    if isinstance(record.get("control"), dict):
        record["control"].pop("internal_id", None)
    for entry in record.get("comparisons") or []:
        if isinstance(entry.get("candidate"), dict):
            entry["candidate"].pop("internal_id", None)
    # Whatever shape the report grows, no upstream model id or host leaves.
    return Redactor(literals=identifier_literals(refs)).value(record)


# --- samples ---------------------------------------------------------------------------


def _sample_key(seed: int, usage_id: uuid.UUID, answered: bool) -> int:
    digest = hashlib.blake2b(usage_id.bytes, key=seed.to_bytes(8, "big"), digest_size=8).digest()
    return (0 if answered else 1) << 64 | int.from_bytes(digest, "big")


def _has_blob(value: Any) -> bool:
    return isinstance(value, str) and is_sha256_hex(value)


def choose_samples(
    version_id: uuid.UUID,
    report: ExperimentReport,
    count: int,
    seed: int,
    *,
    with_answers: bool,
    scanned: Callable[[int], None],
) -> list[uuid.UUID]:
    """The ids of the ``count`` requests of one checkpoint with the smallest keys (bottom-k
    sampling): the same rows for the same seed whatever order the database returns them."""
    rows = ExperimentRequest.objects.filter(variant_version_id=version_id, has_error=False).exclude(
        request_body_sha256__in=[PROMPT_HASH_FAILED, PROMPT_HASH_DELETED]
    )
    since, until = report.filters.since, report.filters.until
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    columns = ["usage_id", "response_sha256"] if with_answers else ["usage_id"]
    heap: list[tuple[int, uuid.UUID]] = []  # the kept keys, negated: a max-heap
    seen = 0
    for values in rows.values_list(*columns).iterator(chunk_size=SCAN_CHUNK):
        key = _sample_key(seed, values[0], with_answers and _has_blob(values[1]))
        if len(heap) < count:
            heapq.heappush(heap, (-key, values[0]))
        elif key < -heap[0][0]:
            heapq.heapreplace(heap, (-key, values[0]))
        seen += 1
        if seen % 1000 == 0:
            scanned(1000)
    scanned(seen % 1000)
    return [usage_id for _, usage_id in sorted(heap, key=lambda item: -item[0])]


def _decode(blob: bytes) -> Any:
    """A stored body: its JSON when it parses, else its text (a truncated body)."""
    text = blob.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _without_upstream_fields(body: Any, upstream: dict) -> Any:
    """The prompt as the client sent it, as far as can be told: without the ``model`` the
    gateway set to the upstream model id and the checkpoint's ``extra_body`` fields."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body.pop("model", None)
    extra = upstream.get("extra_body")
    for key, value in extra.items() if isinstance(extra, dict) else ():
        if body.get(key) == value:
            del body[key]
    return body


SAMPLE_COLUMNS = (
    "usage_id",
    "request_kind",
    "request_body_sha256",
    "was_truncated",
    "is_stream",
    "input_tokens",
    "output_tokens",
    "ttfb_ms",
    "total_ms",
)


@dataclass
class SampleSet:
    written: int = 0
    per_checkpoint: dict[str, int] = field(default_factory=dict)
    answers: int = 0


class HashingFile:
    """A file written line by line (a sample can be megabytes: never all in memory),
    hashed and counted as it goes."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, content: bytes) -> None:
        self.handle.write(content)
        self.digest.update(content)
        self.size += len(content)

    def close(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return {"sha256": self.digest.hexdigest(), "bytes": self.size}


def build_samples(
    report: ExperimentReport,
    refs: dict[uuid.UUID, CheckpointRef],
    *,
    count: int,
    seed: int,
    redactor: Redactor,
    progress: Progress,
    sink: HashingFile,
) -> SampleSet:
    with_answers = answers_captured()
    store = get_prompt_store()
    result = SampleSet()
    checkpoints = report.checkpoints
    expected_rows = sum(c.requests for c in checkpoints)
    scanned_rows = 0

    def scanned(rows: int) -> None:
        nonlocal scanned_rows
        scanned_rows += rows
        progress("scan", min(scanned_rows, expected_rows), max(expected_rows, 1))

    chosen: list[tuple[CheckpointRef, list[uuid.UUID]]] = []
    for stats in checkpoints:
        ids = choose_samples(
            stats.version_id, report, count, seed, with_answers=with_answers, scanned=scanned
        )
        chosen.append((refs[stats.version_id], ids))
    progress("scan", max(expected_rows, 1), max(expected_rows, 1))

    total = sum(len(ids) for _, ids in chosen)
    done = 0
    columns = SAMPLE_COLUMNS + (("response_sha256",) if with_answers else ())
    for ref, ids in chosen:
        details = {}
        for start in range(0, len(ids), DETAIL_CHUNK):
            part = ids[start : start + DETAIL_CHUNK]
            for values in ExperimentRequest.objects.filter(usage_id__in=part).values(*columns):
                details[values["usage_id"]] = values
        number = 0
        for usage_id in ids:
            done += 1
            values = details.get(usage_id)
            if values is None:  # dropped by retention since it was chosen
                progress("read", done, total)
                continue
            prompt = _read(store, values["request_body_sha256"], ref, "prompt")
            answer = None
            if with_answers and _has_blob(values.get("response_sha256")):
                answer = _read(store, values["response_sha256"], ref, "answer")
                result.answers += 1
            number += 1
            sample = {
                "checkpoint": {
                    "version_id": str(ref.version_id),
                    "slot": ref.slot,
                    "label": ref.label,
                },
                "sample": number,
                "request_kind": values["request_kind"],
                "stream": values["is_stream"],
                "prompt_truncated": values["was_truncated"],
                "input_tokens": values["input_tokens"],
                "output_tokens": values["output_tokens"],
                "ttfb_ms": values["ttfb_ms"],
                "total_ms": values["total_ms"],
                "prompt": redactor.value(_without_upstream_fields(_decode(prompt), ref.upstream)),
                "answer": redactor.value(_decode(answer)) if answer is not None else None,
            }
            sink.write(json.dumps(sample, ensure_ascii=False).encode("utf-8") + b"\n")
            result.written += 1
            progress("read", done, total)
        result.per_checkpoint[str(ref.version_id)] = number
    if total == 0:
        progress("read", 0, 0)
    return result


def _read(store, sha256: str, ref: CheckpointRef, what: str) -> bytes:
    try:
        return store.get(sha256)
    except KeyError:
        reason = "missing or corrupt in the prompt store"
    except Exception as error:  # an unreachable S3 store, a permission error
        reason = f"the prompt store could not be read ({type(error).__name__})"
    raise ExportError(
        f"The {what} of a sampled request of checkpoint {ref.label} is {reason}; "
        "no bundle was written. Check the store, or export without samples (--samples 0)."
    )


# --- the folder ------------------------------------------------------------------------


def _write(folder: Path, name: str, content: bytes) -> dict:
    path = folder / name
    with open(path, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    return {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def check_destination(out: Path) -> Path:
    """Where the bundle goes: a new folder, or an empty one. Refuses anything else."""
    out = Path(os.path.abspath(out))
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"{out} exists and is not a folder; choose a new folder for --out.")
        if any(out.iterdir()):
            raise ExportError(f"{out} is not empty; choose a new or empty folder for --out.")
    if not out.parent.is_dir():
        raise ExportError(f"The folder {out.parent} does not exist; create it first.")
    return out


@dataclass
class ExportRequest:
    since: datetime | None
    until: datetime | None
    samples: int
    seed: int


@dataclass
class ExportSummary:
    out: Path
    files: dict[str, dict]
    samples: int
    checkpoints: int
    redactions: dict[str, int]


def write_bundle(
    out: Path,
    report: ExperimentReport,
    request: ExportRequest,
    *,
    extra_patterns: list[re.Pattern[str]],
    progress: Progress,
) -> ExportSummary:
    out = check_destination(out)
    record = report_record(report)
    refs = checkpoint_refs(report, record)
    redactor = Redactor(extra=extra_patterns, literals=identifier_literals(refs))
    try:
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise ExportError(f"Cannot write in {out.parent}: {error.strerror or error}.") from None
    try:
        files = {
            REPORT: _write(partial, REPORT, _json_bytes(provider_safe_report(record, report, refs)))
        }
        sample_set = None
        if request.samples:
            sink = HashingFile(partial / SAMPLES)
            try:
                sample_set = build_samples(
                    report,
                    refs,
                    count=request.samples,
                    seed=request.seed,
                    redactor=redactor,
                    progress=progress,
                    sink=sink,
                )
            finally:
                files[SAMPLES] = sink.close()
        manifest = build_manifest(report, record, refs, request, sample_set, redactor, files)
        _write(partial, MANIFEST, _json_bytes(manifest))
        directory = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        try:
            # Replaces an empty folder; refuses one that has filled up meanwhile.
            os.rename(partial, out)
        except OSError as error:
            raise ExportError(
                f"Cannot move the finished bundle to {out}: {error.strerror or error}."
            ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExportSummary(
        out=out,
        files=files,
        samples=sample_set.written if sample_set else 0,
        checkpoints=len(refs),
        redactions=dict(redactor.counts),
    )


def build_manifest(
    report: ExperimentReport,
    record: dict,
    refs: dict[uuid.UUID, CheckpointRef],
    request: ExportRequest,
    sample_set: SampleSet | None,
    redactor: Redactor,
    files: dict[str, dict],
) -> dict:
    entries = [entry for slot in record["slots"] for entry in slot["checkpoints"]]
    checkpoints = []
    for stats, entry in zip(report.checkpoints, entries, strict=True):
        ref = refs[stats.version_id]
        checkpoint = {
            "version_id": str(stats.version_id),
            "slot": ref.slot,
            "label": ref.label,
            "number": ref.number,
            "effective_from": _iso(stats.effective_from),
            "effective_until": _iso(stats.effective_until),
            "requests": stats.requests,
        }
        for name in CHECKPOINT_NAME_FIELDS:
            if name in entry:
                checkpoint[name] = entry[name]
        checkpoints.append(checkpoint)
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "tool": {"name": "model-experiments experiment_export", "version": tool_version()},
        "generated_at": _iso(report.generated_at),
        "experiment": {
            "name": report.experiment.name,
            "public_model_id": report.experiment.public_model_id,
            "status": report.experiment.status,
        },
        "window": {
            "requested_since": _iso(request.since),
            "requested_until": _iso(request.until),
            "since": _iso(report.filters.since),
            "until": _iso(report.filters.until),
            "widened_to_whole_minutes": report.filters.widened,
        },
        "checkpoints": checkpoints,
        "samples": None,
        "redaction": {
            "applies_to": "every string of samples.jsonl (prompts, answers, keys of objects)",
            "kinds": sorted(
                {"email", "phone", "ipv4", "ipv6", "url_with_credentials", "api_key"}
                | {"bearer_token", "token", "private_key", "checkpoint_identifier"}
            ),
            "extra_patterns": len(redactor.extra),
            "replaced": dict(sorted(redactor.counts.items())),
        },
        "left_out": [
            "user ids",
            "machine ids",
            "IP addresses",
            "subject pseudonyms",
            "client request ids",
            "usage ids",
            "request times",
            "partner keys and key fingerprints",
            "upstream configuration (base URLs, upstream model ids, extra body fields)",
        ],
        "files": files,
    }
    if sample_set is not None:
        manifest["samples"] = {
            "per_checkpoint_requested": request.samples,
            "seed": request.seed,
            "method": SAMPLING_METHOD,
            "answers": (
                "included where the request's answer was captured"
                if answers_captured()
                else "not captured by this version"
            ),
            "answers_included": sample_set.answers,
            "per_checkpoint": sample_set.per_checkpoint,
        }
    return Redactor(literals=identifier_literals(refs)).value(manifest)
