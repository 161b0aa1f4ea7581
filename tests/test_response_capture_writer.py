"""The usage writer's side of response capture: the answer is assembled and stored off the
request path, its hash survives a spool replay like the prompt's, a lost capture says
``__failed__``, and the stored answer is bounded."""

from __future__ import annotations

import json

import pytest

from experiments.models import PROMPT_HASH_FAILED, ExperimentRequest, RequestKind
from experiments.prompts import answers
from experiments.prompts.answers import CapturedAnswer, answer_document, capture_answer
from experiments.prompts.store import LocalPromptStore
from gateway.spool import Spool, json_line
from gateway.usage import writer
from tests.gateway_server import wait_until
from tests.test_usage_writer import attributed, spool_dir, version  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


def chat_body(text: str) -> bytes:
    return json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    ).encode()


def sampled(version, text: str):  # noqa: F811
    record = attributed(version)
    record.attribution.answer = CapturedAnswer(RequestKind.CHAT_COMPLETIONS, body=chat_body(text))
    return record


def test_the_writer_stores_a_sampled_answer_and_leaves_others_null(spool_dir, version):  # noqa: F811
    answered, plain = sampled(version, "stored by the writer"), attributed(version)
    for record in (answered, plain):
        writer.submit(record)
    assert writer.flush(timeout=30)
    row = ExperimentRequest.objects.get(usage_id=answered.id)
    store = LocalPromptStore(spool_dir.parent / "prompts")
    assert json.loads(store.get_answer(row.response_sha256))["text"] == "stored by the writer"
    assert ExperimentRequest.objects.get(usage_id=plain.id).response_sha256 is None


def test_a_replayed_segment_keeps_the_answer_hash_and_a_lost_capture_says_failed(
    spool_dir,  # noqa: F811
    version,  # noqa: F811
):
    # A process spooled three records, captured one answer, then died before writing rows.
    dead = Spool(spool_dir, 10**9, 1.0)
    dead.open()
    kept, lost, plain = sampled(version, "kept"), sampled(version, "lost"), attributed(version)
    for record in (kept, lost, plain):
        dead.append(json_line(record.spool_entry()))
    answer_hash = "cd" * 32
    dead.append_to(dead.current, json_line({"answer_of": kept.id.hex, "sha256": answer_hash}))
    segment_path = dead.current.path
    dead.release_all()

    writer.start()
    wait_until(lambda: not segment_path.exists(), timeout=10)
    hashes = dict(ExperimentRequest.objects.values_list("usage_id", "response_sha256"))
    assert hashes == {kept.id: answer_hash, lost.id: PROMPT_HASH_FAILED, plain.id: None}


def test_a_failed_store_write_gives_failed_and_never_raises(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store's folder should be")
    captured = CapturedAnswer(RequestKind.CHAT_COMPLETIONS, body=chat_body("x"))
    assert capture_answer(captured, store=LocalPromptStore(blocked)) == PROMPT_HASH_FAILED


@pytest.mark.django_db(transaction=False)
def test_a_long_answer_is_cut_at_a_code_point_and_marked_truncated(monkeypatch):
    monkeypatch.setattr(answers, "MAX_ANSWER_BYTES", 10)
    document = answer_document(
        CapturedAnswer(RequestKind.CHAT_COMPLETIONS, body=chat_body("ééééééé"))  # 14 bytes
    )
    assert document == {"text": "ééééé", "tool_calls": [], "truncated": True}


@pytest.mark.django_db(transaction=False)
def test_a_stream_past_the_collection_bound_is_kept_up_to_it_and_marked_truncated(monkeypatch):
    monkeypatch.setattr(answers, "MAX_COLLECTED_STREAM_BYTES", 350)
    captured = CapturedAnswer(RequestKind.MESSAGES)
    for piece in ["one ", "two ", "three ", "four ", "five "]:
        event = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": piece},
        }
        captured.add(f"event: content_block_delta\ndata: {json.dumps(event)}\n\n".encode())
    assert captured.cut and captured.collected <= 350
    document = answer_document(captured)
    assert document["truncated"] is True
    assert document["text"] == "one two "


@pytest.mark.django_db(transaction=False)
def test_the_partner_key_is_scrubbed_from_the_assembled_text_and_arguments():
    key = "sk-canary-in-the-writer"
    body = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "content": f"key {key}",
                        "tool_calls": [{"function": {"name": "f", "arguments": f'"{key}"'}}],
                    },
                }
            ]
        }
    ).encode()
    captured = CapturedAnswer(
        RequestKind.CHAT_COMPLETIONS, body=body, scrub=lambda s: s.replace(key, "[redacted]")
    )
    document = answer_document(captured)
    assert key not in json.dumps(document)
    assert document["text"] == "key [redacted]"
