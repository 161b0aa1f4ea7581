"""Migration 0003 backfills attribution rows written before it from their usage rows."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("experiments", "0002_request_subject_hash"), ("gateway", "0001_initial")]
AFTER = [("experiments", "0003_request_measures_and_compact_subject")]
MOMENT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture
def old_rows():
    """Rows as the schema before 0003 held them: one with a hex hash, one user row without."""
    apps = _migrate(BEFORE)
    user = apps.get_model("auth", "User").objects.create(username="migrated-user")
    experiment = apps.get_model("experiments", "Experiment").objects.create(
        public_model_id="kilo/migrated", name="Migrated", status="active"
    )
    variant = apps.get_model("experiments", "Variant").objects.create(
        experiment=experiment, label="a", weight=1
    )
    version = apps.get_model("experiments", "VariantVersion").objects.create(
        variant=variant,
        upstream={"internal_id": "rc-1", "base_url": "https://partner.example/v1"},
        encrypted_api_key={"iv": "x", "data": "y", "authTag": "z"},
        effective_at=MOMENT,
    )
    usage_model = apps.get_model("gateway", "GatewayUsage")
    request_model = apps.get_model("experiments", "ExperimentRequest")
    machine_hash = hashlib.sha256(b"some machine seed").hexdigest()
    made = {}
    for name, user_id, kind, subject_hash, measures in [
        ("machine", None, "machine", machine_hash, (200, False, True, 11, 22, 33, 44)),
        ("user", user.pk, "user", None, (502, True, False, 5, 0, None, 900)),
    ]:
        status, error, stream, tokens_in, tokens_out, ttfb, total = measures
        usage = usage_model.objects.create(
            created_at=MOMENT,
            user_id=user_id,
            public_model_id="kilo/migrated",
            request_kind="chat_completions",
            is_stream=stream,
            status_code=status,
            has_error=error,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            ttfb_ms=ttfb,
            total_ms=total,
        )
        request_model.objects.create(
            usage_id=usage.pk,
            variant_version_id=version.pk,
            allocation_subject=kind,
            allocation_subject_hash=subject_hash,
            request_kind="chat_completions",
            request_body_sha256="__failed__",
            created_at=MOMENT,
        )
        made[name] = usage.pk
    yield made, experiment.pk, user.pk, machine_hash
    # Leave the schema as the rest of the suite expects: every migration applied, also
    # those after 0003 that going back to BEFORE reverted.
    _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


def test_backfill_copies_every_usage_measure(old_rows):
    made, _, _, _ = old_rows
    apps = _migrate(AFTER)
    usage_model = apps.get_model("gateway", "GatewayUsage")
    request_model = apps.get_model("experiments", "ExperimentRequest")
    names = ("status_code", "has_error", "is_stream", "input_tokens", "output_tokens")
    names += ("ttfb_ms", "total_ms")
    for usage_id in made.values():
        usage = usage_model.objects.get(pk=usage_id)
        request = request_model.objects.get(pk=usage_id)
        assert [getattr(request, n) for n in names] == [getattr(usage, n) for n in names]


def test_backfill_shortens_hex_hashes_and_rebuilds_user_subject_hashes(old_rows):
    made, experiment_id, user_id, machine_hash = old_rows
    apps = _migrate(AFTER)
    request_model = apps.get_model("experiments", "ExperimentRequest")
    machine = request_model.objects.get(pk=made["machine"])
    assert machine.allocation_subject_hash == uuid.UUID(machine_hash[:32])
    seed = f"model_exp_{str(experiment_id).lower()}_user_{user_id}"
    expected = uuid.UUID(bytes=hashlib.sha256(seed.encode()).digest()[:16])
    assert request_model.objects.get(pk=made["user"]).allocation_subject_hash == expected
