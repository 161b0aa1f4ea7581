"""The structural lock (SPEC §3): bucket boundaries only move in draft."""

from __future__ import annotations

import pytest
from django.contrib.admin.models import LogEntry

from experiments import services
from experiments.models import Experiment, ExperimentStatus, Variant, VariantVersion
from tests.factories import make_experiment

S = ExperimentStatus
AFTER_DRAFT = [S.ACTIVE, S.PAUSED, S.COMPLETED]


def _snapshot(experiment: Experiment) -> tuple:
    """Everything a structural edit could touch, plus the history."""
    return (
        Experiment.objects.filter(pk=experiment.pk).values().get(),
        list(Variant.objects.filter(experiment=experiment).order_by("id").values()),
        VariantVersion.objects.filter(variant__experiment=experiment).count(),
        LogEntry.objects.filter(object_id=str(experiment.pk)).count(),
    )


@pytest.mark.django_db
def test_add_variant_in_draft():
    experiment = make_experiment()
    variant = services.add_variant(experiment=experiment, label="slot-c", weight=3)
    assert (variant.label, variant.weight) == ("slot-c", 3)
    assert experiment.variants.count() == 3


@pytest.mark.django_db
@pytest.mark.parametrize("status", AFTER_DRAFT)
def test_add_variant_after_draft_is_locked(status):
    experiment = make_experiment(status=status)
    before = _snapshot(experiment)
    with pytest.raises(services.StructureLocked, match=f"experiment is {status}"):
        services.add_variant(experiment=experiment, label="slot-c", weight=1)
    assert _snapshot(experiment) == before


@pytest.mark.django_db
def test_remove_variant_in_draft_takes_its_versions_along():
    experiment = make_experiment()
    variant = experiment.variants.first()
    services.remove_variant(variant=variant)
    assert not Variant.objects.filter(pk=variant.pk).exists()
    assert not VariantVersion.objects.filter(variant_id=variant.pk).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("status", AFTER_DRAFT)
def test_remove_variant_after_draft_is_locked(status):
    experiment = make_experiment(status=status)
    before = _snapshot(experiment)
    with pytest.raises(services.StructureLocked, match=f"experiment is {status}"):
        services.remove_variant(variant=experiment.variants.first())
    assert _snapshot(experiment) == before


@pytest.mark.django_db
def test_weight_change_in_draft():
    experiment = make_experiment()
    variant = services.set_variant_weight(variant=experiment.variants.first(), weight=5)
    variant.refresh_from_db()
    assert variant.weight == 5


@pytest.mark.django_db
@pytest.mark.parametrize("status", AFTER_DRAFT)
def test_weight_change_after_draft_is_locked(status):
    experiment = make_experiment(status=status)
    before = _snapshot(experiment)
    with pytest.raises(services.StructureLocked, match=f"experiment is {status}"):
        services.set_variant_weight(variant=experiment.variants.first(), weight=5)
    assert _snapshot(experiment) == before


@pytest.mark.django_db
@pytest.mark.parametrize("weight", [0, -1, "abc", "1.5", 1.5, True, None, 1_000_001])
def test_weight_must_be_a_positive_whole_number(weight):
    experiment = make_experiment()
    before = _snapshot(experiment)
    with pytest.raises(services.InvalidInput) as invalid:
        services.add_variant(experiment=experiment, label="slot-c", weight=weight)
    assert invalid.value.field == "weight"
    assert _snapshot(experiment) == before


@pytest.mark.django_db
def test_public_id_change_in_draft():
    experiment = make_experiment(public_model_id="kilo/preview-old")
    services.update_experiment(experiment=experiment, public_model_id="kilo/preview-new")
    experiment.refresh_from_db()
    assert experiment.public_model_id == "kilo/preview-new"


@pytest.mark.django_db
@pytest.mark.parametrize("status", AFTER_DRAFT)
def test_public_id_change_after_draft_is_locked_and_writes_nothing(status):
    experiment = make_experiment(status=status, public_model_id="kilo/preview-old")
    before = _snapshot(experiment)
    with pytest.raises(services.StructureLocked, match=f"experiment is {status}"):
        # The name would be allowed on its own; the whole edit is refused together.
        services.update_experiment(
            experiment=experiment, name="Renamed", public_model_id="kilo/preview-new"
        )
    assert _snapshot(experiment) == before


@pytest.mark.django_db
@pytest.mark.parametrize("status", AFTER_DRAFT)
def test_restating_the_same_public_id_after_draft_is_not_a_change(status):
    experiment = make_experiment(status=status, public_model_id="kilo/preview-same")
    before = _snapshot(experiment)
    services.update_experiment(experiment=experiment, public_model_id="kilo/preview-same")
    assert _snapshot(experiment) == before


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED])
def test_label_change_allowed_before_completion(status):
    experiment = make_experiment(status=status)
    variant = services.rename_variant(variant=experiment.variants.first(), label="renamed")
    variant.refresh_from_db()
    assert variant.label == "renamed"


@pytest.mark.django_db
def test_label_change_after_completion_is_locked():
    experiment = make_experiment(status=S.COMPLETED)
    before = _snapshot(experiment)
    with pytest.raises(services.StructureLocked, match="experiment is completed"):
        services.rename_variant(variant=experiment.variants.first(), label="renamed")
    assert _snapshot(experiment) == before


@pytest.mark.django_db
def test_duplicate_label_on_add_is_invalid_input():
    experiment = make_experiment()
    before = _snapshot(experiment)
    with pytest.raises(services.InvalidInput, match="'slot-a' already exists") as invalid:
        services.add_variant(experiment=experiment, label="slot-a", weight=1)
    assert invalid.value.field == "label"
    assert _snapshot(experiment) == before


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED])
def test_duplicate_label_on_rename_is_invalid_input(status):
    experiment = make_experiment(status=status)
    before = _snapshot(experiment)
    slot_b = experiment.variants.get(label="slot-b")
    with pytest.raises(services.InvalidInput, match="'slot-a' already exists") as invalid:
        services.rename_variant(variant=slot_b, label="slot-a")
    assert invalid.value.field == "label"
    assert _snapshot(experiment) == before


@pytest.mark.django_db
@pytest.mark.parametrize("label", ["", "   ", "x" * 65])
def test_label_must_be_1_to_64_characters(label):
    experiment = make_experiment()
    before = _snapshot(experiment)
    with pytest.raises(services.InvalidInput) as invalid:
        services.add_variant(experiment=experiment, label=label, weight=1)
    assert invalid.value.field == "label"
    assert _snapshot(experiment) == before


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.ACTIVE, S.PAUSED, S.COMPLETED])
def test_name_and_description_are_always_editable(status):
    experiment = make_experiment(status=status)
    services.update_experiment(
        experiment=experiment, name="A clearer name", description="What we learned."
    )
    experiment.refresh_from_db()
    assert (experiment.name, experiment.description) == ("A clearer name", "What we learned.")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "  "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"description": "x" * 2001}, "description"),
        ({"public_model_id": "kilo/preview with space"}, "public_model_id"),
        ({"public_model_id": ""}, "public_model_id"),
    ],
)
def test_invalid_experiment_fields_are_refused_per_field(fields, field):
    experiment = make_experiment()
    before = _snapshot(experiment)
    with pytest.raises(services.InvalidInput) as invalid:
        services.update_experiment(experiment=experiment, **fields)
    assert invalid.value.field == field
    assert _snapshot(experiment) == before
