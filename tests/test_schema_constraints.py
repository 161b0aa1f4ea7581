"""The database is the final authority (SPEC §2): its constraints hold without the services.

Every write here bypasses experiments.services on purpose (QuerySet.update or a
plain create), so only the constraints declared on the models stand in the way.
"""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from django.db import IntegrityError, transaction

from experiments.models import (
    PROMPT_HASH_DELETED,
    PROMPT_HASH_FAILED,
    Experiment,
    ExperimentStatus,
    Variant,
)
from tests.factories import (
    ExperimentFactory,
    ExperimentRequestFactory,
    VariantFactory,
    make_experiment,
)

S = ExperimentStatus


@contextlib.contextmanager
def _refused_by_the_database():
    # The savepoint keeps the test's transaction usable after the error on PostgreSQL.
    with pytest.raises(IntegrityError), transaction.atomic():
        yield


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["archived", "running", "", "ACTIVE"])
def test_status_outside_the_four_values_is_refused(status):
    experiment = ExperimentFactory()
    with _refused_by_the_database():
        Experiment.objects.filter(pk=experiment.pk).update(status=status)
    assert Experiment.objects.get(pk=experiment.pk).status == S.DRAFT


@pytest.mark.django_db
def test_active_and_archived_is_refused():
    experiment = make_experiment(status=S.ACTIVE)
    with _refused_by_the_database():
        Experiment.objects.filter(pk=experiment.pk).update(is_archived=True)


@pytest.mark.django_db
def test_activating_an_archived_row_is_refused():
    experiment = make_experiment(status=S.PAUSED, is_archived=True)
    with _refused_by_the_database():
        Experiment.objects.filter(pk=experiment.pk).update(status=S.ACTIVE)


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.DRAFT, S.PAUSED, S.COMPLETED])
def test_archived_is_allowed_in_any_other_status(status):
    ExperimentFactory(status=status, is_archived=True)


@pytest.mark.django_db
@pytest.mark.parametrize("weight", [0, -1])
def test_weight_must_be_positive(weight):
    variant = VariantFactory()
    with _refused_by_the_database():
        Variant.objects.filter(pk=variant.pk).update(weight=weight)


@pytest.mark.django_db
def test_empty_label_is_refused():
    variant = VariantFactory()
    with _refused_by_the_database():
        Variant.objects.filter(pk=variant.pk).update(label="")


@pytest.mark.django_db
def test_duplicate_label_within_an_experiment_is_refused():
    variant = VariantFactory(label="slot-a")
    with _refused_by_the_database():
        Variant.objects.create(experiment=variant.experiment, label="slot-a", weight=1)


@pytest.mark.django_db
def test_same_label_in_different_experiments_is_allowed():
    VariantFactory(label="slot-a")
    VariantFactory(label="slot-a")
    assert Variant.objects.filter(label="slot-a").count() == 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("first", "second"),
    [(S.ACTIVE, S.ACTIVE), (S.ACTIVE, S.PAUSED), (S.PAUSED, S.PAUSED), (S.PAUSED, S.ACTIVE)],
)
def test_second_routing_experiment_on_a_public_id_is_refused(first, second):
    ExperimentFactory(status=first, public_model_id="kilo/preview-x")
    with _refused_by_the_database():
        ExperimentFactory(status=second, public_model_id="kilo/preview-x")


@pytest.mark.django_db
def test_switching_a_second_experiment_to_active_on_a_held_public_id_is_refused():
    ExperimentFactory(status=S.ACTIVE, public_model_id="kilo/preview-x")
    draft = ExperimentFactory(public_model_id="kilo/preview-x")
    with _refused_by_the_database():
        Experiment.objects.filter(pk=draft.pk).update(status=S.ACTIVE)


@pytest.mark.django_db
def test_drafts_and_completed_experiments_share_a_public_id_freely():
    for status in (S.DRAFT, S.DRAFT, S.COMPLETED, S.COMPLETED, S.ACTIVE):
        ExperimentFactory(status=status, public_model_id="kilo/preview-x")
    assert Experiment.objects.filter(public_model_id="kilo/preview-x").count() == 5


@pytest.mark.django_db
@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        hashlib.sha256(b"x").hexdigest().upper(),
        hashlib.sha256(b"x").hexdigest()[:63],
        hashlib.sha256(b"x").hexdigest()[:63] + "g",
        "__other__",
    ],
    ids=["empty", "short", "uppercase", "63-chars", "non-hex", "unknown-sentinel"],
)
def test_invalid_request_body_sha256_is_refused(value):
    with _refused_by_the_database():
        ExperimentRequestFactory(request_body_sha256=value)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "value", [hashlib.sha256(b"x").hexdigest(), PROMPT_HASH_FAILED, PROMPT_HASH_DELETED]
)
def test_valid_request_body_sha256_is_accepted(value):
    assert ExperimentRequestFactory(request_body_sha256=value).request_body_sha256 == value


@pytest.mark.django_db
def test_unknown_allocation_subject_is_refused():
    with _refused_by_the_database():
        ExperimentRequestFactory(allocation_subject="cookie")
