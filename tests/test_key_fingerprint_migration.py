"""Migration 0004 records the key fingerprint of existing checkpoints the key in use opens."""

from __future__ import annotations

import pytest

from experiments import crypto
from tests.migration_support import migrate_to, migrate_to_latest

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("experiments", "0003_request_measures_and_compact_subject")]
AFTER = [("experiments", "0004_version_key_fingerprint")]


@pytest.fixture
def old_versions():
    """Checkpoints as stored before 0004: one under the key in use, one under another key."""
    apps = migrate_to(BEFORE)
    experiment = apps.get_model("experiments", "Experiment").objects.create(
        public_model_id="kilo/migrated-keys", name="Migrated keys"
    )
    variant = apps.get_model("experiments", "Variant").objects.create(
        experiment=experiment, label="a", weight=1
    )
    versions = apps.get_model("experiments", "VariantVersion").objects
    upstream = {"internal_id": "rc-1", "base_url": "https://partner.example/v1"}
    ours = versions.create(
        variant=variant, upstream=upstream, encrypted_api_key=crypto.encrypt_api_key("sk-a")
    )
    foreign = versions.create(
        variant=variant,
        upstream=upstream,
        encrypted_api_key=crypto.encrypt_api_key("sk-b", key_b64=crypto.generate_key()),
    )
    yield ours.pk, foreign.pk
    migrate_to_latest()


def test_backfill_records_the_fingerprint_only_where_the_key_in_use_decrypts(old_versions):
    ours, foreign = old_versions
    versions = migrate_to(AFTER).get_model("experiments", "VariantVersion").objects
    assert versions.get(pk=ours).key_fingerprint == crypto.key_fingerprint()
    assert versions.get(pk=foreign).key_fingerprint == ""  # unknown
