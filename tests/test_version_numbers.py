"""Checkpoints people can name (SPEC §10): per-slot version numbers, key rotations
within a number, stored at insert, backfilled by migration 0012, under concurrency,
and carried by every output that names a checkpoint."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, connections, transaction
from django.utils import timezone

from experiments import crypto, services
from experiments.models import Variant, VariantVersion
from experiments.selectors import slot_histories, version_labels
from tests.conftest import requires_postgres
from tests.factories import VariantFactory, VariantVersionFactory, upstream_config
from tests.migration_support import migrate_to, migrate_to_latest


def _numbers(variant) -> list[tuple[str, int, int, str]]:
    """(internal id, number, rotation, label) of a slot's versions in effective order."""
    return [
        (v.internal_id, v.version_number, v.key_rotation, v.label)
        for v in VariantVersion.objects.filter(variant=variant)
        .select_related("variant")
        .order_by("effective_at", "id")
    ]


@pytest.mark.django_db
def test_swaps_count_up_and_key_rotations_stay_in_their_number_family():
    slot = VariantFactory(label="rc1")
    other = VariantFactory(experiment=slot.experiment, label="rc2")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-1"), api_key="sk-1")
    services.hot_swap(variant=other, upstream=upstream_config(internal_id="x-1"), api_key="sk-x")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-2"))
    services.rotate_key(variant=slot, api_key="sk-2")
    services.rotate_key(variant=slot, api_key="sk-3")
    # The same upstream again with the same key is a reload, not a rotation: a new number.
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-2"))
    # The same upstream with a new key typed into the hot-swap form is a rotation.
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-2"), api_key="sk-4")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-3"), api_key="sk-4")
    services.hot_swap(variant=other, upstream=upstream_config(internal_id="x-2"))
    assert _numbers(slot) == [
        ("m-1", 1, 0, "rc1 v1"),
        ("m-2", 2, 0, "rc1 v2"),
        ("m-2", 2, 1, "rc1 v2.1 · key rotated"),
        ("m-2", 2, 2, "rc1 v2.2 · key rotated"),
        ("m-2", 3, 0, "rc1 v3"),
        ("m-2", 3, 1, "rc1 v3.1 · key rotated"),
        ("m-3", 4, 0, "rc1 v4"),
    ]
    assert _numbers(other) == [("x-1", 1, 0, "rc2 v1"), ("x-2", 2, 0, "rc2 v2")]
    rotated = VariantVersion.objects.get(variant=slot, version_number=2, key_rotation=1)
    assert rotated.key_rotated and rotated.version_name == "v2.1"


@pytest.mark.django_db
def test_the_report_history_names_each_checkpoint_with_its_stored_number():
    slot = VariantFactory(label="rc1")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-1"), api_key="sk-1")
    services.rotate_key(variant=slot, api_key="sk-2")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-2"))
    (history,) = slot_histories(slot.experiment)
    assert [(c.label, c.key_rotated) for c in history.checkpoints] == [
        ("rc1 v1", False),
        ("rc1 v1.1 · key rotated", True),
        ("rc1 v2", False),
    ]
    labels = version_labels(slot.experiment)
    assert sorted(identity.label for identity in labels.values()) == [
        "rc1 v1",
        "rc1 v1.1 · key rotated",
        "rc1 v2",
    ]


@pytest.mark.django_db
def test_a_duplicate_number_in_a_slot_is_refused_by_the_database():
    first = VariantVersionFactory()
    assert (first.version_number, first.key_rotation) == (1, 0)
    with pytest.raises(IntegrityError), transaction.atomic():
        VariantVersionFactory(variant=first.variant, version_number=1, key_rotation=0)


# --- migration 0012 backfills existing rows ----------------------------------------

BEFORE = [("experiments", "0012_control_slot")]
AFTER = [("experiments", "0013_version_numbers")]


@pytest.fixture
def unnumbered_versions():
    """Versions as stored before 0012, inserted out of effective order."""
    apps = migrate_to(BEFORE)
    experiment = apps.get_model("experiments", "Experiment").objects.create(
        public_model_id="kilo/migrated-numbers", name="Migrated numbers"
    )
    variants = apps.get_model("experiments", "Variant").objects
    slot = variants.create(experiment=experiment, label="rc1", weight=1)
    other = variants.create(experiment=experiment, label="rc2", weight=1)
    versions = apps.get_model("experiments", "VariantVersion").objects
    start = timezone.now() - timedelta(days=3)
    key_a, key_b = crypto.encrypt_api_key("sk-a"), crypto.encrypt_api_key("sk-b")
    key_c = crypto.encrypt_api_key("sk-c")
    plan = [
        # (name, slot, internal id, envelope, hours after start); inserted in this order
        ("reload", slot, "m-2", key_b, 4),  # same upstream and key as before: new number
        ("first", slot, "m-1", key_a, 0),
        ("rotation", slot, "m-2", key_b, 3),  # same upstream, new key: rotation of m-2
        ("swap", slot, "m-2", key_a, 2),
        ("other", other, "m-1", key_a, 1),
        ("second-rotation", slot, "m-2", key_c, 5),
        ("last", slot, "m-3", key_c, 6),
    ]
    ids = {}
    for name, variant, internal_id, envelope, hours in plan:
        ids[name] = versions.create(
            variant=variant,
            upstream=upstream_config(internal_id=internal_id),
            encrypted_api_key=envelope,
            effective_at=start + timedelta(hours=hours),
        ).pk
    yield ids
    migrate_to_latest()


@pytest.mark.django_db(transaction=True)
def test_migration_numbers_existing_versions_in_effective_order_per_slot(unnumbered_versions):
    versions = migrate_to(AFTER).get_model("experiments", "VariantVersion").objects
    numbered = {
        name: (row.version_number, row.key_rotation)
        for name, pk in unnumbered_versions.items()
        for row in [versions.get(pk=pk)]
    }
    assert numbered == {
        "first": (1, 0),
        "swap": (2, 0),
        "rotation": (2, 1),
        "reload": (3, 0),
        "second-rotation": (3, 1),
        "last": (4, 0),
        "other": (1, 0),
    }


@pytest.mark.django_db(transaction=True)
def test_after_the_migration_the_next_swap_continues_the_slots_numbers(unnumbered_versions):
    migrate_to_latest()
    slot = Variant.objects.get(label="rc1", experiment__public_model_id="kilo/migrated-numbers")
    services.rotate_key(variant=slot, api_key="sk-d")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-4"))
    assert [label for *_, label in _numbers(slot)][-3:] == [
        "rc1 v4",
        "rc1 v4.1 · key rotated",
        "rc1 v5",
    ]


# --- concurrency ------------------------------------------------------------------

SWAPPERS = 4


def _waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        # Statistics views are a snapshot per transaction unless cleared.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_swaps_on_one_slot_wait_for_its_lock_and_get_distinct_numbers():
    slot = VariantFactory(label="rc1")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-0"), api_key="sk-0")
    outcomes: dict[int, object] = {}

    def swap(index: int) -> None:
        try:
            if index % 2:
                version = services.rotate_key(variant=slot.pk, api_key=f"sk-{index}")
            else:
                version = services.hot_swap(
                    variant=slot.pk, upstream=upstream_config(internal_id=f"m-{index}")
                )
            outcomes[index] = (version.version_number, version.key_rotation)
        except Exception as exc:  # asserted on below
            outcomes[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=swap, args=(i,)) for i in range(1, SWAPPERS + 1)]
    with transaction.atomic():
        # Hold the slot's row lock: every swap must queue behind it, then behind each other.
        Variant.objects.select_for_update().get(pk=slot.pk)
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while _waiting_on_a_lock() < SWAPPERS:
            assert time.monotonic() < deadline, f"the swaps did not wait for the lock: {outcomes}"
            time.sleep(0.02)
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert all(isinstance(outcome, tuple) for outcome in outcomes.values()), outcomes
    numbers = [(n, r) for _, n, r, _ in _numbers(slot)]
    assert len(set(numbers)) == SWAPPERS + 1
    assert numbers[0] == (1, 0)
    # Each number follows from the one before it, in the order the lock let them in.
    for (number, rotation), (next_number, next_rotation) in zip(numbers, numbers[1:], strict=False):
        assert (next_number, next_rotation) in ((number, rotation + 1), (number + 1, 0))


# --- outputs --------------------------------------------------------------------


@pytest.fixture
def named_experiment():
    slot = VariantFactory(label="rc1", experiment__status="draft")
    other = VariantFactory(experiment=slot.experiment, label="rc2")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-1"), api_key="sk-1")
    services.hot_swap(variant=other, upstream=upstream_config(internal_id="x-1"), api_key="sk-x")
    services.hot_swap(variant=slot, upstream=upstream_config(internal_id="m-2"))
    services.rotate_key(variant=slot, api_key="sk-2")
    return slot.experiment


def _report(experiment, fmt: str) -> str:
    out = io.StringIO()
    call_command("experiment_report", str(experiment.pk), "--format", fmt, stdout=out)
    return out.getvalue()


def _expected(experiment) -> dict[str, tuple[int, int, bool, str]]:
    return {
        str(v.pk): (v.version_number, v.key_rotation, v.key_rotated, v.label)
        for v in VariantVersion.objects.filter(variant__experiment=experiment).select_related(
            "variant"
        )
    }


@pytest.mark.django_db
def test_report_json_carries_each_checkpoints_version_id_number_and_rotation(named_experiment):
    exported = json.loads(_report(named_experiment, "json"))
    checkpoints = [c for slot in exported["slots"] for c in slot["checkpoints"]]
    got = {
        c["version_id"]: (c["version_number"], c["key_rotation"], c["key_rotated"], c["label"])
        for c in checkpoints
    }
    assert got == _expected(named_experiment)
    assert sorted(c["label"] for c in checkpoints) == [
        "rc1 v1",
        "rc1 v2",
        "rc1 v2.1 · key rotated",
        "rc2 v1",
    ]
    assert all(isinstance(c["key_rotated"], bool) for c in checkpoints)


@pytest.mark.django_db
def test_report_csv_has_the_same_columns_flattened(named_experiment):
    rows = list(csv.DictReader(io.StringIO(_report(named_experiment, "csv"))))
    got = {
        row["version_id"]: (
            int(row["version_number"]),
            int(row["key_rotation"]),
            row["key_rotated"] == "True",
            row["label"],
        )
        for row in rows
    }
    assert got == _expected(named_experiment)


@pytest.mark.django_db
def test_report_table_names_checkpoints_and_shows_effective_seconds(named_experiment):
    text = _report(named_experiment, "table")
    assert "rc1 v2.1 · key rotated (m-2)" in text
    first = VariantVersion.objects.get(variant__label="rc1", version_number=1)
    assert f"{first.effective_at:%Y-%m-%d %H:%M:%S} → " in text


@pytest.mark.django_db
def test_experiment_show_lists_the_numbered_history_with_seconds(named_experiment):
    out = io.StringIO()
    call_command("experiment", "show", str(named_experiment.pk), stdout=out)
    text = out.getvalue()
    rotated = VariantVersion.objects.get(variant__label="rc1", key_rotation=1)
    assert "Checkpoint history" in text
    history_line = next(line for line in text.splitlines() if str(rotated.pk) in line)
    assert "rc1 v2.1 · key rotated" in history_line
    assert rotated.effective_at.isoformat(timespec="seconds") in history_line
    out = io.StringIO()
    call_command("experiment", "show", str(named_experiment.pk), "--json", stdout=out)
    shown = json.loads(out.getvalue())["experiment"]
    current = {v["label"]: v["current_checkpoint"] for v in shown["variants"]}
    assert current["rc1"]["label"] == "rc1 v2.1 · key rotated"
    assert current["rc1"]["key_rotated"] is True
    assert (current["rc2"]["version_number"], current["rc2"]["key_rotation"]) == (1, 0)
    assert sorted(c["label"] for c in shown["checkpoint_history"]) == [
        "rc1 v1",
        "rc1 v2",
        "rc1 v2.1 · key rotated",
        "rc2 v1",
    ]
