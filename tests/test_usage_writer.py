"""The usage writer against the real database (SPEC §9): a record the database refuses is
sanitised or set aside for inspection, never dropped, and never takes its batch with it;
writing a record twice counts it once; a dead process's spool segment lands exactly once."""

from __future__ import annotations

import json
import uuid

import pytest
from django.utils import timezone

from experiments.models import ExperimentRequest, RequestKind
from gateway.models import GatewayUsage
from gateway.spool import QUARANTINE_NAME, Spool, json_line
from gateway.usage import Attribution, UsageRecord, record_rows, write_rows, writer
from tests.conftest import requires_postgres
from tests.factories import VariantVersionFactory
from tests.gateway_server import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "partner-model", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def spool_dir(settings, tmp_path):
    settings.GATEWAY_SPOOL_DIR = tmp_path / "spool"
    settings.PROMPT_STORE_DIR = tmp_path / "prompts"
    return settings.GATEWAY_SPOOL_DIR


@pytest.fixture
def version():
    return VariantVersionFactory()


def attributed(version, *, client_request_id: str = "req", **usage_fields) -> UsageRecord:
    fields = {
        "created_at": timezone.now(),
        "user_id": None,
        "public_model_id": "kilo/writer",
        "request_kind": RequestKind.CHAT_COMPLETIONS,
        "is_stream": False,
        "status_code": 200,
        "has_error": False,
        "error_kind": None,
        "input_tokens": 3,
        "output_tokens": 5,
        "ttfb_ms": 10,
        "total_ms": 20,
        **usage_fields,
    }
    return UsageRecord(
        **fields,
        attribution=Attribution(
            version_id=str(version.pk),
            allocation_subject="machine",
            client_request_id=client_request_id,
            allocation_subject_hash=uuid.uuid4(),
            upstream_body=BODY,
        ),
    )


def submit_all(records: list[UsageRecord]) -> None:
    for record in records:
        writer.submit(record)
    assert writer.flush(timeout=30)


def quarantined(spool_dir) -> list[dict]:
    path = spool_dir / QUARANTINE_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


POISONS = [
    # SQLite stores NUL bytes and any text length: those two are PostgreSQL refusals.
    pytest.param({"public_model_id": "kilo/nul\x00model"}, id="nul", marks=requires_postgres),
    pytest.param({"client_request_id": "req-\ud800-lone"}, id="lone-surrogate"),
    pytest.param({"error_kind": "e" * 500}, id="over-long", marks=requires_postgres),
]


@pytest.mark.parametrize("poison", POISONS)
def test_a_refused_record_lands_sanitised_and_its_batch_mates_land(spool_dir, version, poison):
    mates = [attributed(version, client_request_id=f"mate-{index}") for index in range(4)]
    poisoned = attributed(version, **{"client_request_id": "poisoned", **poison})

    submit_all([mates[0], mates[1], poisoned, mates[2], mates[3]])

    assert GatewayUsage.objects.count() == 5
    assert sorted(ExperimentRequest.objects.values_list("client_request_id", flat=True)) == sorted(
        [f"mate-{index}" for index in range(4)]
        + [poison.get("client_request_id", "poisoned").replace("\ud800", "\ufffd")]
    )


def test_the_original_of_a_sanitised_record_is_kept_in_the_quarantine_file(spool_dir, version):
    poisoned = attributed(version, client_request_id="req-\ud800-lone")

    submit_all([poisoned])

    row = ExperimentRequest.objects.get()
    assert row.client_request_id == "req-\ufffd-lone"
    [entry] = quarantined(spool_dir)
    assert entry["action"] == "sanitised"
    assert entry["record"]["id"] == poisoned.id.hex
    assert entry["record"]["attribution"]["client_request_id"] == "req-\ud800-lone"


def test_a_record_still_refused_after_sanitising_is_set_aside_and_its_batch_mates_land(
    spool_dir, version
):
    mates = [attributed(version, client_request_id=f"mate-{index}") for index in range(2)]
    orphan = attributed(version, client_request_id="orphan")
    orphan.attribution.version_id = str(uuid.uuid4())  # a checkpoint that does not exist

    submit_all([mates[0], orphan, mates[1]])

    assert sorted(ExperimentRequest.objects.values_list("client_request_id", flat=True)) == [
        "mate-0",
        "mate-1",
    ]
    assert GatewayUsage.objects.count() == 2
    [entry] = quarantined(spool_dir)
    assert (entry["action"], entry["record"]["id"]) == ("set_aside", orphan.id.hex)


def test_a_client_model_id_of_any_length_is_recorded_cut_to_512_characters(spool_dir, version):
    submit_all([attributed(version, public_model_id="m" * 100_000)])

    assert GatewayUsage.objects.get().public_model_id == "m" * 512
    assert quarantined(spool_dir) == []


def test_token_counts_beyond_the_column_are_recorded_clamped(spool_dir, version):
    submit_all([attributed(version, input_tokens=2**40, output_tokens=-5)])

    row = ExperimentRequest.objects.get()
    assert (row.input_tokens, row.output_tokens) == (2**31 - 1, 0)
    assert quarantined(spool_dir) == []


def test_writing_records_already_in_the_database_inserts_nothing_and_reports_none_new(
    spool_dir, version
):
    spool = Spool(spool_dir, 10**9, 1.0)
    rows = [record_rows(attributed(version).spool_entry(), None) for _ in range(3)]

    assert write_rows(rows, spool) == rows
    assert write_rows(rows, spool) == []
    assert (GatewayUsage.objects.count(), ExperimentRequest.objects.count()) == (3, 3)


def test_a_segment_left_by_a_dead_process_is_adopted_and_written_once(spool_dir, version):
    # A process spooled two records, wrote one of them, kept the other's prompt hash, died.
    dead = Spool(spool_dir, 10**9, 1.0)
    dead.open()
    landed, waiting = attributed(version), attributed(version)
    for record in (landed, waiting):
        dead.append(json_line(record.spool_entry()))
    write_rows([record_rows(landed.spool_entry(), None)], dead)
    prompt_hash = "ab" * 32
    dead.append_to(
        dead.current,
        json_line({"prompt_of": waiting.id.hex, "sha256": prompt_hash, "truncated": False}),
    )
    segment_path = dead.current.path
    dead.release_all()  # what the kernel does with a dead process's locks

    writer.start()
    wait_until(lambda: not segment_path.exists(), timeout=10)

    assert GatewayUsage.objects.count() == 2
    assert ExperimentRequest.objects.get(usage_id=waiting.id).request_body_sha256 == prompt_hash


def test_a_spool_line_from_before_finish_reasons_lands_without_one(spool_dir, version):
    entry = attributed(version, finish_reason="length").spool_entry()
    old = {name: value for name, value in entry.items() if name != "finish_reason"}
    strange = {**entry, "id": uuid.uuid4().hex, "finish_reason": "not-a-reason"}
    fresh = {**entry, "id": uuid.uuid4().hex}
    rows = [record_rows(line, None) for line in (old, strange, fresh)]
    write_rows(rows, Spool(spool_dir, 10**9, 1.0))
    landed = dict(ExperimentRequest.objects.values_list("usage_id", "finish_reason"))
    assert [landed[uuid.UUID(line["id"])] for line in (old, strange, fresh)] == [
        None,
        None,
        "length",
    ]


def test_the_writer_derives_the_error_category_from_status_and_kind(spool_dir, version):
    records = [
        attributed(version, client_request_id="ok"),
        attributed(
            version,
            client_request_id="forbidden",
            status_code=403,
            has_error=True,
            error_kind="upstream_http_403",
        ),
        attributed(
            version,
            client_request_id="gateway",
            status_code=503,
            has_error=True,
            error_kind="routing_unavailable",
        ),
    ]
    submit_all(records)
    categories = dict(ExperimentRequest.objects.values_list("client_request_id", "error_category"))
    assert categories == {"ok": None, "forbidden": "auth", "gateway": "other"}
    usage = GatewayUsage.objects.values_list("error_category", flat=True)
    assert sorted(usage, key=lambda category: category or "") == [None, "auth", "other"]
