"""``experiment_export``: a provider-safe bundle (issue 10).

A seeded experiment written through the gateway's writer, prompts kept in the real
prompt store, with canaries planted wherever an identifier lives: user ids, machine
ids and IPs (as subjects), client request ids, usage ids, the partner key (encrypted
on the version, and pasted into a prompt), upstream model ids, hosts and extra body
fields, e-mails and keys in prompts. No byte of the bundle may hold any of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from experiments.export.bundle import SAMPLES, _sample_key, answers_captured
from experiments.management.commands.experiment_report import report_record
from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    AllocationSubject,
    VariantVersion,
)
from experiments.prompts.store import LocalPromptStore, blob_key, capture_prompt
from experiments.reports.filters import ReportFilters
from experiments.reports.report import experiment_report
from tests.conftest import CANARY_API_KEY
from tests.factories import VariantVersionFactory, upstream_config
from tests.report_seed import SeededRequest, insert_requests, seed_experiment

pytestmark = pytest.mark.django_db

CANARY_USER_PK = 917_364_285
CANARY_USERNAME = "canary-username-q7x2"
CANARY_MACHINE = "machine-canary-4c1d9e"
CANARY_IP = "198.51.100.203"
CANARY_CRID = "crid-canary-8e2f17"
CANARY_INTERNAL_ID = "canary-model-x7"
CANARY_HOST = "canary-partner.example.net"
CANARY_EXTRA_VALUE = "canary-extra-value-55"
CANARY_EMAIL = "dana.canary@example.org"
CANARY_PHONE = "+1 415 555 0199"
CANARY_ANTHROPIC_KEY = "sk-ant-api03-CanaryKey0123456789abcdefXYZ"
CANARY_AWS_KEY = "AKIACANARY0123456789"
CANARY_URL_PASSWORD = "pw-canary-3k"
CANARY_BEARER = "canaryBearerToken123456"

PLANTED_PROMPT = (
    f"Mail {CANARY_EMAIL} or call {CANARY_PHONE}; my key is {CANARY_API_KEY}, "
    f"the other {CANARY_ANTHROPIC_KEY} and {CANARY_AWS_KEY}; the box is {CANARY_IP}, "
    f"repo https://svc:{CANARY_URL_PASSWORD}@intranet.example.com/x, "
    f"header Authorization: Bearer {CANARY_BEARER}; {CANARY_INTERNAL_ID} told me so."
)


def question(index: int) -> dict:
    return {
        "model": "rc-alpha-1",
        "messages": [{"role": "user", "content": f"question {index}: what is 2+{index}?"}],
    }


def question_index(sample: dict) -> int | None:
    messages = sample["prompt"]["messages"]
    text = messages[0]["content"]
    if text.startswith("question "):
        return int(text.split(":", 1)[0].removeprefix("question "))
    return None


def subject_hash(experiment, kind: str, value: str) -> str:
    return hashlib.sha256(f"model_exp_{experiment.pk}_{kind}_{value}".encode()).hexdigest()


@pytest.fixture
def store(settings, tmp_path: Path) -> LocalPromptStore:
    settings.PROMPT_STORE_BACKEND = "local"
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    return LocalPromptStore(tmp_path / "prompts")


@pytest.fixture
def seeded(store):
    """The report seed (two slots, slot-a hot-swapped) with prompts in the store, then a
    hot-swap of slot-b to a canary upstream serving the canary requests."""
    start = (timezone.now() - timedelta(hours=3)).replace(microsecond=0)
    seeded = seed_experiment(
        subjects=24, requests=72, api_key=CANARY_API_KEY, prompts=question, start=start
    )
    experiment = seeded.experiment
    slot_b = seeded.versions["b1"].variant
    swap_at = start + timedelta(hours=2, minutes=10)
    b2 = VariantVersionFactory(
        variant=slot_b,
        upstream=upstream_config(
            internal_id=CANARY_INTERNAL_ID,
            base_url=f"https://{CANARY_HOST}/v1",
            extra_body={"canary_param": CANARY_EXTRA_VALUE},
        ),
        effective_at=swap_at,
        api_key=CANARY_API_KEY,
    )
    seeded.versions["b2"] = b2
    user = get_user_model().objects.create(pk=CANARY_USER_PK, username=CANARY_USERNAME)
    sent = {  # the body as the gateway sends it upstream: its model id and extra body
        "model": CANARY_INTERNAL_ID,
        "canary_param": CANARY_EXTRA_VALUE,
        "messages": [{"role": "user", "content": PLANTED_PROMPT}],
    }
    subjects = [
        (AllocationSubject.USER, str(user.pk), user.pk),
        (AllocationSubject.MACHINE, CANARY_MACHINE, None),
        (AllocationSubject.IP, CANARY_IP, None),
    ]
    canary_rows = []
    for index, body_sha256 in enumerate(
        [capture_prompt(sent)[0]] * 3
        + [capture_prompt(question(1000))[0], PROMPT_HASH_DELETED, PROMPT_HASH_FAILED]
    ):
        kind, value, user_id = subjects[index % 3]
        canary_rows.append(
            SeededRequest(
                usage_id=uuid.uuid4(),
                created_at=swap_at + timedelta(minutes=1 + index),
                version_id=b2.pk,
                slot_label="slot-b",
                subject_kind=kind,
                subject_hash=subject_hash(experiment, kind, value),
                user_id=user_id,
                client_request_id=CANARY_CRID,
                has_error=False,
                error_kind=None,
                error_category=None,
                finish_reason="stop",
                status_code=200,
                is_stream=False,
                ttfb_ms=100 + index,
                total_ms=900 + index,
                input_tokens=10,
                output_tokens=20,
                body_sha256=body_sha256,
            )
        )
    # One error on the canary checkpoint: errors are not sampled.
    canary_rows.append(
        SeededRequest(
            **{
                **vars(canary_rows[0]),
                "usage_id": uuid.uuid4(),
                "has_error": True,
                "error_kind": "upstream_http_500",
                "error_category": "upstream_5xx",
                "finish_reason": None,
                "status_code": 500,
            }
        )
    )
    insert_requests(canary_rows, public_model_id=experiment.public_model_id)
    seeded.requests += canary_rows
    return seeded


def export(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("experiment_export", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refusal(*args: str) -> tuple[str, str]:
    out = io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command("experiment_export", *args, stdout=out, stderr=io.StringIO())
    assert refused.value.returncode == 1
    assert "\n" not in str(refused.value)
    return str(refused.value), out.getvalue()


def bundle_files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def samples_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / SAMPLES).read_text().splitlines()]


def sampleable(seeded, version_id) -> list[SeededRequest]:
    return [
        row
        for row in seeded.requests
        if row.version_id == version_id
        and not row.has_error
        and row.body_sha256 not in (PROMPT_HASH_DELETED, PROMPT_HASH_FAILED)
    ]


# --- nothing that identifies anyone ------------------------------------------------------


def forbidden_strings(seeded) -> list[str]:
    experiment = seeded.experiment
    forbidden = [
        str(CANARY_USER_PK),
        CANARY_USERNAME,
        CANARY_MACHINE,
        CANARY_IP,
        CANARY_CRID,
        CANARY_INTERNAL_ID,
        CANARY_HOST,
        CANARY_EXTRA_VALUE,
        CANARY_EMAIL,
        "415 555 0199",
        CANARY_API_KEY,
        CANARY_API_KEY.removeprefix("sk-"),
        CANARY_ANTHROPIC_KEY.removeprefix("sk-ant-"),
        CANARY_AWS_KEY,
        CANARY_URL_PASSWORD,
        CANARY_BEARER,
        str(experiment.pk),
    ]
    for version in VariantVersion.with_ciphertext.filter(variant__experiment=experiment):
        forbidden += [version.upstream["internal_id"], version.key_fingerprint]
        forbidden += [str(value) for value in version.encrypted_api_key.values()]
    for row in seeded.requests:
        forbidden += [str(row.usage_id), row.usage_id.hex, row.subject_hash[:32]]
        forbidden.append(str(uuid.UUID(row.subject_hash[:32])))
        if row.client_request_id:
            forbidden.append(f'"{row.client_request_id}"')
        if row.user_id is not None:
            forbidden.append(f'"user_id": {row.user_id}')
    return [text for text in forbidden if text]


def test_no_byte_of_the_bundle_holds_an_identifier_key_or_upstream_detail(seeded, tmp_path):
    out = tmp_path / "bundle"
    export(str(seeded.experiment.pk), "--out", str(out), "--samples", "1000")
    files = bundle_files(out)
    assert set(files) == {"manifest.json", "report.json", "samples.jsonl"}
    leaks = [
        (name, text)
        for name, content in files.items()
        for text in forbidden_strings(seeded)
        if text.encode() in content
    ]
    assert leaks == []
    # Not vacuous: the planted prompt is in the bundle, its secrets replaced by type.
    planted = [
        s
        for s in samples_of(out)
        if s["checkpoint"]["label"] == "slot-b v2" and question_index(s) is None
    ]
    assert len(planted) == 3
    text = planted[0]["prompt"]["messages"][0]["content"]
    for placeholder in ("[email]", "[phone]", "[api-key]", "[ipv4]", "[url-with-credentials]"):
        assert placeholder in text
    assert "Bearer [bearer-token]" in text and "[checkpoint] told me so" in text
    # The upstream's fields are gone from the prompt: model id and extra body.
    assert set(planted[0]["prompt"]) == {"messages"}


def test_samples_skip_errors_wiped_and_failed_prompts_and_cover_every_checkpoint(seeded, tmp_path):
    out = tmp_path / "bundle"
    export(str(seeded.experiment.pk), "--out", str(out), "--samples", "1000")
    manifest = json.loads((out / "manifest.json").read_text())
    samples = samples_of(out)
    for name, version in seeded.versions.items():
        expected = sampleable(seeded, version.pk)
        got = [s for s in samples if s["checkpoint"]["version_id"] == str(version.pk)]
        assert len(got) == len(expected), name
        assert manifest["samples"]["per_checkpoint"][str(version.pk)] == len(expected)
        assert expected  # every checkpoint has requests to sample
    assert [s["sample"] for s in samples[:3]] == [1, 2, 3]


def test_sampling_is_the_seeded_bottom_k_and_repeats_with_the_same_seed(seeded, tmp_path):
    export(
        str(seeded.experiment.pk),
        "--out",
        str(tmp_path / "one"),
        "--samples",
        "4",
        "--seed",
        "12345",
    )
    export(
        str(seeded.experiment.pk),
        "--out",
        str(tmp_path / "two"),
        "--samples",
        "4",
        "--seed",
        "12345",
    )
    export(
        str(seeded.experiment.pk),
        "--out",
        str(tmp_path / "three"),
        "--samples",
        "4",
        "--seed",
        "54321",
    )
    one, two = (tmp_path / "one" / SAMPLES).read_bytes(), (tmp_path / "two" / SAMPLES).read_bytes()
    assert one == two
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["samples"]["seed"] == 12345
    for seed, folder in ((12345, "one"), (54321, "three")):
        samples = samples_of(tmp_path / folder)
        for name in ("a1", "a2", "b1"):
            version = seeded.versions[name]
            # Independently: the 4 sampleable seeded rows with the smallest keyed hash.
            rows = sorted(
                sampleable(seeded, version.pk),
                key=lambda row, s=seed: _sample_key(s, row.usage_id, False),
            )
            expected = [question_index_of(seeded, row) for row in rows[:4]]
            got = [
                question_index(s)
                for s in samples
                if s["checkpoint"]["version_id"] == str(version.pk)
            ]
            assert got == expected, (seed, name)
    assert samples_of(tmp_path / "one") != samples_of(tmp_path / "three")


def question_index_of(seeded, row: SeededRequest) -> int:
    return seeded.requests.index(row)


# --- manifest and report --------------------------------------------------------------


def test_the_manifest_names_every_file_by_hash_and_size_and_the_checkpoints(seeded, tmp_path):
    out = tmp_path / "bundle"
    export(str(seeded.experiment.pk), "--out", str(out), "--samples", "2", "--seed", "9")
    manifest = json.loads((out / "manifest.json").read_text())
    files = bundle_files(out)
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {
            "sha256": hashlib.sha256(files[name]).hexdigest(),
            "bytes": len(files[name]),
        }
    experiment = seeded.experiment
    assert manifest["experiment"] == {
        "name": experiment.name,
        "public_model_id": experiment.public_model_id,
        "status": experiment.status,
    }
    assert manifest["tool"]["version"]
    labels = {c["version_id"]: c["label"] for c in manifest["checkpoints"]}
    assert labels == {
        str(seeded.versions["a1"].pk): "slot-a v1",
        str(seeded.versions["a2"].pk): "slot-a v2",
        str(seeded.versions["b1"].pk): "slot-b v1",
        str(seeded.versions["b2"].pk): "slot-b v2",
    }
    assert manifest["samples"]["seed"] == 9
    assert manifest["samples"]["answers"] == (
        "included where the request's answer was captured"
        if answers_captured()
        else "not captured by this version"
    )


def test_report_json_is_the_report_code_paths_output_naming_checkpoints_by_version(
    seeded, tmp_path
):
    out = tmp_path / "bundle"
    since = (seeded.start + timedelta(minutes=30)).isoformat()
    export(str(seeded.experiment.pk), "--out", str(out), "--since", since)
    exported = json.loads((out / "report.json").read_text())
    filters = ReportFilters(since=seeded.start + timedelta(minutes=30))
    expected = report_record(experiment_report(seeded.experiment, filters))
    labels = {
        str(v.pk): label
        for v, label in (
            (seeded.versions["a1"], "slot-a v1"),
            (seeded.versions["a2"], "slot-a v2"),
            (seeded.versions["b1"], "slot-b v1"),
            (seeded.versions["b2"], "slot-b v2"),
        )
    }
    assert exported.pop("generated_at") and expected.pop("generated_at")
    exported_slots, expected_slots = exported.pop("slots"), expected.pop("slots")
    exported_comparisons = exported.pop("comparisons")
    expected_comparisons = expected.pop("comparisons")
    exported_control, expected_control = exported.pop("control"), expected.pop("control")
    assert exported == expected  # experiment, window, notes, SRM: as the report has them
    assert expected_control.pop("internal_id")
    assert "internal_id" not in exported_control and exported_control == expected_control
    assert labels[exported_control["version_id"]] == exported_control["label"]
    for got_slot, want_slot in zip(exported_slots, expected_slots, strict=True):
        got_checkpoints, want_checkpoints = (
            got_slot.pop("checkpoints"),
            want_slot.pop("checkpoints"),
        )
        assert got_slot == want_slot
        for got, want in zip(got_checkpoints, want_checkpoints, strict=True):
            version_id, label = got.pop("version_id"), got.pop("label")
            assert labels[version_id] == label
            want.pop("internal_id")
            want.pop("version_id", None)
            want.pop("label", None)
            assert got == want
    assert len(exported_comparisons) == len(expected_comparisons) > 0
    for got, want in zip(exported_comparisons, expected_comparisons, strict=True):
        assert want["candidate"].pop("internal_id")
        assert "internal_id" not in got["candidate"]
        assert labels[got["candidate_version_id"]] == got["candidate"]["label"]
        assert got == want
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["window"]["requested_since"] == since
    assert manifest["window"]["since"] == exported["window"]["since"]


# --- all or nothing -------------------------------------------------------------------


def test_a_non_empty_out_is_refused_and_left_alone(seeded, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    reason, _ = refusal(str(seeded.experiment.pk), "--out", str(out))
    assert reason == f"{out} is not empty; choose a new or empty folder for --out."
    assert bundle_files(out) == {"notes.txt": b"mine"}


def test_an_empty_out_folder_is_filled(seeded, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    export(str(seeded.experiment.pk), "--out", str(out))
    assert set(bundle_files(out)) == {"manifest.json", "report.json"}


def test_an_out_that_cannot_be_created_is_refused_with_nothing_written(seeded, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    reason, _ = refusal(str(seeded.experiment.pk), "--out", str(blocker / "bundle"))
    assert reason == f"The folder {blocker} does not exist; create it first."
    reason, _ = refusal(str(seeded.experiment.pk), "--out", str(blocker))
    assert reason == f"{blocker} exists and is not a folder; choose a new folder for --out."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "prompts"]


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_an_unreadable_prompt_fails_the_export_and_leaves_no_folder(
    seeded, store, tmp_path, damage
):
    target = tmp_path / "exports"
    target.mkdir()
    sha = next(r.body_sha256 for r in sampleable(seeded, seeded.versions["b1"].pk))
    path = store.root.joinpath(*blob_key("r", sha).split("/"))
    if damage == "corrupt":
        path.write_bytes(b"W" + b'{"messages": "not what was hashed"}')
    else:
        path.unlink()
    reason, _ = refusal(
        str(seeded.experiment.pk), "--out", str(target / "bundle"), "--samples", "1000"
    )
    assert reason == (
        "The prompt of a sampled request of checkpoint slot-b v1 is missing or corrupt in "
        "the prompt store; no bundle was written. Check the store, or export without "
        "samples (--samples 0)."
    )
    assert list(target.iterdir()) == []  # neither the bundle nor its partial folder


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["--since", "yesterday"],
            "Bad --since 'yesterday': use ISO 8601, e.g. 2025-01-31 or 2025-01-31T12:00:00Z.",
        ),
        (
            ["--until", "2025-13-01"],
            "Bad --until '2025-13-01': use ISO 8601, e.g. 2025-01-31 or 2025-01-31T12:00:00Z.",
        ),
        (["--since", "2025-02-01", "--until", "2025-01-01"], "'since' must not be after 'until'."),
        (["--samples", "many"], "Bad --samples 'many': give a whole number."),
        (["--samples", "-1"], "Bad --samples '-1': give a number from 0 to 10,000."),
        (["--seed", "x"], "Bad --seed 'x': give a whole number."),
        (
            ["--redact", "(unclosed"],
            "The redaction pattern '(unclosed' in --redact is not a "
            "valid regular expression: missing ), unterminated subpattern at position 0.",
        ),
        (
            ["--redact", "a*"],
            "The redaction pattern 'a*' in --redact matches empty text; it would match everywhere.",
        ),
    ],
)
def test_bad_options_are_refused_with_nothing_written(seeded, tmp_path, args, reason):
    out = tmp_path / "bundle"
    assert refusal(str(seeded.experiment.pk), "--out", str(out), *args)[0] == reason
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]


# --- extra patterns, resolution, --json, progress ---------------------------------------


def test_extra_patterns_from_the_setting_and_the_option(seeded, settings, tmp_path):
    settings.EXPORT_REDACT_PATTERNS = [r"question \d+"]
    out = tmp_path / "bundle"
    export(str(seeded.experiment.pk), "--out", str(out), "--samples", "1000", "--redact", r"2\+\d+")
    texts = [s["prompt"]["messages"][0]["content"] for s in samples_of(out)]
    assert "[redacted]: what is [redacted]?" in texts
    assert not any("question " in text for text in texts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["redaction"]["extra_patterns"] == 2
    assert manifest["redaction"]["replaced"]["extra"] >= 2 * (len(texts) - 3)


def test_the_experiment_is_found_like_other_commands_find_it(seeded, tmp_path):
    experiment = seeded.experiment
    for index, reference in enumerate(
        [experiment.public_model_id, str(experiment.pk)[:8], str(experiment.pk)]
    ):
        out = tmp_path / f"by-{index}"
        export(reference, "--out", str(out))
        report = json.loads((out / "report.json").read_text())
        assert report["experiment"]["public_model_id"] == experiment.public_model_id
    assert refusal("kilo/nothing", "--out", str(tmp_path / "x"))[0] == (
        "No experiment matches 'kilo/nothing'."
    )


def test_json_prints_one_object_for_success_and_refusal(seeded, tmp_path):
    out = tmp_path / "bundle"
    printed, _ = export(
        str(seeded.experiment.pk), "--out", str(out), "--samples", "2", "--seed", "3", "--json"
    )
    assert printed.count("\n") == 1
    payload = json.loads(printed)
    assert payload["ok"] is True
    assert payload["out"] == str(out)
    assert payload["seed"] == 3
    assert payload["samples"] == 8  # 2 per checkpoint, 4 checkpoints
    assert set(payload["files"]) == {"report.json", "samples.jsonl"}
    reason, printed = refusal(str(seeded.experiment.pk), "--out", str(out), "--json")
    assert json.loads(printed) == {"ok": False, "error": reason}


def test_progress_is_drawn_on_stderr_and_stdout_says_what_was_written(seeded, tmp_path):
    out = tmp_path / "bundle"
    printed, drawn = export(
        str(seeded.experiment.pk), "--out", str(out), "--samples", "2", "--seed", "1"
    )
    total = sum(1 for row in seeded.requests)
    assert f"scan   [{'#' * 30}] {total}/{total}\n" in drawn
    assert f"read   [{'#' * 30}] 8/8\n" in drawn
    assert printed.splitlines()[0] == (f"Wrote {out}: manifest.json, report.json, samples.jsonl.")
    assert printed.splitlines()[1] == "4 checkpoint(s); 8 sample(s) (seed 1)."


def test_samples_come_from_the_window_of_the_report_only(seeded, tmp_path):
    since = seeded.start + timedelta(minutes=45)
    until = seeded.start + timedelta(minutes=75)
    out = tmp_path / "bundle"
    export(
        str(seeded.experiment.pk),
        "--out",
        str(out),
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--samples",
        "1000",
    )
    # The report's window is moved out to whole minutes; samples follow it.
    since = since.replace(second=0)
    until = until.replace(second=0) + timedelta(minutes=1 if until.second else 0)
    expected = {
        index
        for index, row in enumerate(seeded.requests)
        if since <= row.created_at < until and row in sampleable(seeded, row.version_id)
    }
    assert expected
    assert {question_index(sample) for sample in samples_of(out)} == expected


@pytest.mark.skipif(
    not answers_captured(),
    reason="answers are exported once model_experiment_request has response_sha256",
)
def test_captured_answers_come_first_and_are_redacted(seeded, store, tmp_path):
    from experiments.models import ExperimentRequest

    rows = sampleable(seeded, seeded.versions["b1"].pk)
    for number, row in enumerate(rows[-2:]):
        sha256 = store.put(f"answer {number}: write to eve@example.com".encode())
        ExperimentRequest.objects.filter(usage_id=row.usage_id).update(response_sha256=sha256)
    out = tmp_path / "bundle"
    export(str(seeded.experiment.pk), "--out", str(out), "--samples", "2")
    answers = [
        sample["answer"]
        for sample in samples_of(out)
        if sample["checkpoint"]["version_id"] == str(seeded.versions["b1"].pk)
    ]
    assert sorted(answers) == ["answer 0: write to [email]", "answer 1: write to [email]"]
    assert json.loads((out / "manifest.json").read_text())["samples"]["answers_included"] == 2
