"""The prompt store: byte-exact round trips, message-level dedup, integrity, failure capture."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from experiments.models import PROMPT_HASH_FAILED
from experiments.prompts.store import (
    MAX_PROMPT_BYTES,
    PART_NAMESPACE,
    REQUEST_NAMESPACE,
    LocalPromptStore,
    canonical_body,
    capture_prompt,
    get_prompt_store,
    sha256_hex,
    split_canonical,
)
from tests.prompt_store_fixtures import (  # noqa: F401  (fixtures)
    closed_port,
    make_s3_store,
    moto_endpoint,
    store,
)

SYSTEM_PROMPT = "You are a careful coding agent. " * 40

BODIES = {
    "chat": {
        "model": "kilo/preview-foo",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "Fix the bug."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "x"}]},
        ],
        "temperature": 0.2,
        "stream": True,
    },
    "responses_list": {
        "model": "kilo/preview-foo",
        "instructions": SYSTEM_PROMPT,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ],
    },
    "responses_string": {
        "model": "kilo/preview-foo",
        "instructions": "short",
        "input": "Summarise this: " + "x" * 500,
    },
    "anthropic_system_string": {
        "model": "kilo/preview-foo",
        "max_tokens": 1024,
        "system": SYSTEM_PROMPT,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "anthropic_system_list": {
        "model": "kilo/preview-foo",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    },
    "without_messages": {"model": "kilo/preview-foo", "prompt": "complete me", "n": 2},
    "non_ascii": {
        "model": "kilo/preview-foo",
        "messages": [{"role": "user", "content": 'Grüße, 世界 🌍 — ½ \u2028 \\ " \n'}],
    },
    "numbers_and_nesting": {
        "model": "kilo/preview-foo",
        "messages": [
            {"role": "user", "content": "n", "meta": {"f": 1.0, "g": -0.0, "h": 1e-7}},
            {"role": "user", "content": "m", "big": 2**80, "deep": [[[{"a": [1, 2.5]}]]]},
        ],
        "top_p": 0.1 + 0.2,
        "seed": 12345678901234567890,
    },
}


def blob_names(store_, namespace: str) -> list[str]:
    return [blob.sha256 for blob in store_.backend.list(namespace)]


@pytest.mark.parametrize("name", sorted(BODIES))
def test_round_trip_is_byte_exact(store, name):  # noqa: F811
    canonical, truncated = canonical_body(BODIES[name])
    digest = store.put(canonical)
    assert digest == sha256_hex(canonical)
    assert store.get(digest) == canonical
    assert not truncated


def test_truncated_body_round_trips_byte_exact_with_a_code_point_straddling_the_cut(
    store,  # noqa: F811
):
    prefix = '{"messages":[{"content":"'
    # Pad so that a 3-byte "€" starts one byte before the 4 MiB limit.
    filler = "a" * (MAX_PROMPT_BYTES - 1 - len(prefix.encode()))
    body = {"messages": [{"content": filler + "€" + "tail" * 1000}]}
    canonical, truncated = canonical_body(body)
    assert truncated
    assert len(canonical) == MAX_PROMPT_BYTES - 1  # the straddling "€" is dropped whole
    canonical.decode("utf-8")  # still valid UTF-8
    digest = store.put(canonical)
    assert digest == sha256_hex(canonical)
    assert store.get(digest) == canonical


def test_truncated_session_still_stores_the_messages_before_the_cut_as_parts(tmp_path):
    local = LocalPromptStore(tmp_path)
    history = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    body = {
        "model": "m",
        "messages": [*history, {"role": "user", "content": "z" * MAX_PROMPT_BYTES}],
    }
    canonical, truncated = canonical_body(body)
    assert truncated
    assert local.get(local.put(canonical)) == canonical
    assert len(blob_names(local, PART_NAMESPACE)) == 5


def test_fifty_turn_conversation_stores_each_message_once(tmp_path):
    local = LocalPromptStore(tmp_path)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    digests = []
    for turn in range(50):
        messages.append({"role": "user", "content": f"step {turn}: run the tests"})
        canonical, _ = canonical_body({"model": "m", "messages": messages})
        digests.append(local.put(canonical))
        messages.append({"role": "assistant", "content": f"done {turn}"})
    assert len(blob_names(local, PART_NAMESPACE)) == 1 + 50 + 49
    assert len(blob_names(local, REQUEST_NAMESPACE)) == 50
    canonical_last, _ = canonical_body({"model": "m", "messages": messages[:-1]})
    assert local.get(digests[-1]) == canonical_last


def test_anthropic_system_prompt_is_one_part_shared_across_requests(tmp_path):
    local = LocalPromptStore(tmp_path)
    body = BODIES["anthropic_system_string"]
    local.put(canonical_body(body)[0])
    local.put(canonical_body({**body, "messages": [{"role": "user", "content": "other"}]})[0])
    system_part = sha256_hex(json.dumps(SYSTEM_PROMPT, ensure_ascii=False).encode())
    parts = blob_names(local, PART_NAMESPACE)
    assert parts.count(system_part) == 1
    assert len(parts) == 3  # the system prompt and two distinct user messages


def test_body_without_messages_is_stored_whole(tmp_path):
    local = LocalPromptStore(tmp_path)
    canonical, _ = canonical_body(BODIES["without_messages"])
    local.put(canonical)
    assert blob_names(local, PART_NAMESPACE) == []
    assert local.get(sha256_hex(canonical)) == canonical


def test_put_writes_once_per_unique_content(store):  # noqa: F811
    canonical, _ = canonical_body(BODIES["chat"])
    store.put(canonical)
    before = sorted(blob.key for ns in ("r", "p") for blob in store.backend.list(ns))
    store.put(canonical)
    after = sorted(blob.key for ns in ("r", "p") for blob in store.backend.list(ns))
    assert before == after
    assert len(after) == 1 + 3


def test_corrupted_part_is_detected_on_get(store):  # noqa: F811
    canonical, _ = canonical_body(BODIES["chat"])
    digest = store.put(canonical)
    part = next(iter(store.backend.list(PART_NAMESPACE)))
    store.backend.write(part.key, b'{"role":"user","content":"tampered"}')
    with pytest.raises(KeyError, match="corrupt"):
        store.get(digest)


def test_missing_part_is_detected_on_get(store):  # noqa: F811
    canonical, _ = canonical_body(BODIES["chat"])
    digest = store.put(canonical)
    store.backend.delete(next(iter(store.backend.list(PART_NAMESPACE))).key)
    with pytest.raises(KeyError, match="missing"):
        store.get(digest)


def test_corrupted_whole_blob_is_detected_on_get(tmp_path):
    local = LocalPromptStore(tmp_path)
    canonical, _ = canonical_body(BODIES["without_messages"])
    digest = local.put(canonical)
    local.backend.write(
        f"r/{digest[:2]}/{digest}", b"W" + canonical.replace(b"complete", b"deleted")
    )
    with pytest.raises(KeyError, match="does not match"):
        local.get(digest)


def test_corrupted_manifest_is_detected_on_get(tmp_path):
    local = LocalPromptStore(tmp_path)
    canonical, _ = canonical_body(BODIES["chat"])
    digest = local.put(canonical)
    key = f"r/{digest[:2]}/{digest}"
    local.backend.write(key, local.backend.read(key)[:-5])
    with pytest.raises(KeyError):
        local.get(digest)


def test_get_of_unknown_or_malformed_hash_raises_key_error(store):  # noqa: F811
    with pytest.raises(KeyError):
        store.get("0" * 64)
    with pytest.raises(KeyError):
        store.get("../../etc/passwd")
    assert not store.exists("not-a-hash")


def test_delete_removes_the_request_blob(store):  # noqa: F811
    canonical, _ = canonical_body(BODIES["chat"])
    digest = store.put(canonical)
    assert store.exists(digest)
    store.delete(digest)
    assert not store.exists(digest)


def test_listing_reports_size_and_age_of_every_blob(store):  # noqa: F811
    canonical, _ = canonical_body(BODIES["without_messages"])
    digest = store.put(canonical)
    (blob,) = store.backend.list(REQUEST_NAMESPACE)
    assert blob.sha256 == digest
    assert blob.size == len(canonical) + 1  # type byte
    assert blob.modified.tzinfo is not None


def test_capture_prompt_returns_hash_and_truncation_flag(tmp_path):
    local = LocalPromptStore(tmp_path)
    digest, truncated = capture_prompt(BODIES["chat"], store=local)
    assert digest == sha256_hex(canonical_body(BODIES["chat"])[0])
    assert truncated is False


def test_capture_prompt_returns_failed_when_the_local_folder_is_unwritable(tmp_path):
    # Tests may run as root, which ignores read-only modes: a file where the folder
    # should be fails for everyone.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert capture_prompt(BODIES["chat"], store=LocalPromptStore(blocker)) == (
        PROMPT_HASH_FAILED,
        False,
    )


def test_capture_prompt_returns_failed_when_the_s3_endpoint_is_down():
    from experiments.prompts.store import S3PromptStore

    down = S3PromptStore(
        bucket="prompts",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=1,
        connect_timeout=1,
    )
    assert capture_prompt(BODIES["chat"], store=down) == (PROMPT_HASH_FAILED, False)


def test_capture_prompt_returns_failed_for_a_body_that_is_not_json():
    assert capture_prompt({"model": object()}, store=LocalPromptStore(tempfile.mkdtemp())) == (
        PROMPT_HASH_FAILED,
        False,
    )


def test_get_prompt_store_uses_the_s3_settings(settings, moto_endpoint):  # noqa: F811
    configured = make_s3_store(moto_endpoint)
    settings.PROMPT_STORE_BACKEND = "s3"
    settings.PROMPT_STORE_S3_BUCKET = configured.backend.storage.bucket_name
    settings.PROMPT_STORE_S3_ENDPOINT_URL = moto_endpoint
    settings.PROMPT_STORE_S3_REGION = "us-east-1"
    settings.PROMPT_STORE_S3_ACCESS_KEY_ID = "test-access-key"
    settings.PROMPT_STORE_S3_SECRET_ACCESS_KEY = "test-secret-key"
    settings.PROMPT_STORE_S3_PREFIX = "prompts/"
    digest, _ = capture_prompt(BODIES["chat"])
    assert configured.get(digest) == canonical_body(BODIES["chat"])[0]


def test_get_prompt_store_defaults_to_the_local_folder(settings, tmp_path):
    settings.PROMPT_STORE_BACKEND = "local"
    settings.PROMPT_STORE_DIR = tmp_path / "configured"
    digest, _ = capture_prompt(BODIES["chat"])
    assert LocalPromptStore(tmp_path / "configured").get(digest) == get_prompt_store().get(digest)


# --- Any JSON body survives the split and the rebuild byte for byte -----------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.fixed_dictionaries(
    {"model": st.text(max_size=10)},
    optional={
        "messages": st.lists(json_values, max_size=6),
        "input": json_values,
        "system": json_values,
        "instructions": st.text(max_size=400),
        "tools": st.lists(json_values, max_size=3),
        "extra": json_values,
    },
)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, cut=st.integers(min_value=1, max_value=400))
def test_any_json_body_round_trips_byte_exact_whole_and_truncated(body, cut):
    canonical, _ = canonical_body(body)
    with tempfile.TemporaryDirectory() as root:
        local = LocalPromptStore(Path(root))
        assert local.get(local.put(canonical)) == canonical
        if body.get("messages"):
            assert split_canonical(canonical) is not None  # deduplicated, not stored whole
        # The same body cut anywhere (as truncation does) still rebuilds exactly.
        shortened = canonical[: max(1, len(canonical) - cut)]
        try:
            shortened.decode("utf-8")
        except UnicodeDecodeError:
            return
        assert local.get(local.put(shortened)) == shortened
