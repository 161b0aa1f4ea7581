"""The lifecycle state machine (SPEC §3), exercised through the service module."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from experiments import services
from experiments.models import Experiment, ExperimentStatus, Variant, VariantVersion
from tests.factories import (
    ExperimentFactory,
    VariantFactory,
    VariantVersionFactory,
    make_experiment,
)

S = ExperimentStatus

#: (status, is_archived) → action → expected outcome:
#:   a (status, is_archived) pair: the transition happens and leaves the row so;
#:   "noop": an idempotent repeat that changes nothing;
#:   "refused": TransitionRefused naming the current status, row unchanged;
#:   "deleted": the row is gone.
MATRIX: dict[tuple[str, bool], dict[str, object]] = {
    (S.DRAFT, False): {
        "activate": (S.ACTIVE, False),
        "pause": "refused",
        "complete": "refused",
        "archive": (S.DRAFT, True),
        "unarchive": "noop",
        "delete": "deleted",
    },
    (S.DRAFT, True): {
        "activate": "refused",
        "pause": "refused",
        "complete": "refused",
        "archive": "noop",
        "unarchive": (S.DRAFT, False),
        "delete": "deleted",
    },
    (S.ACTIVE, False): {
        "activate": "noop",
        "pause": (S.PAUSED, False),
        "complete": (S.COMPLETED, False),
        "archive": "refused",
        "unarchive": "noop",
        "delete": "refused",
    },
    (S.PAUSED, False): {
        "activate": (S.ACTIVE, False),
        "pause": "noop",
        "complete": (S.COMPLETED, False),
        "archive": (S.PAUSED, True),
        "unarchive": "noop",
        "delete": "refused",
    },
    (S.PAUSED, True): {
        "activate": "refused",
        "pause": "noop",
        "complete": (S.COMPLETED, True),
        "archive": "noop",
        "unarchive": (S.PAUSED, False),
        "delete": "refused",
    },
    (S.COMPLETED, False): {
        "activate": "refused",
        "pause": "refused",
        "complete": "noop",
        "archive": (S.COMPLETED, True),
        "unarchive": "noop",
        "delete": "refused",
    },
    (S.COMPLETED, True): {
        "activate": "refused",
        "pause": "refused",
        "complete": "noop",
        "archive": "noop",
        "unarchive": (S.COMPLETED, False),
        "delete": "refused",
    },
}

ACTIONS = {**services.TRANSITIONS, "delete": services.delete_experiment}

CASES = [
    pytest.param(
        status, archived, action, expected, id=f"{status}{'+archived' if archived else ''}-{action}"
    )
    for (status, archived), row in MATRIX.items()
    for action, expected in row.items()
]


def _experiment_in(status: str, archived: bool) -> Experiment:
    experiment = make_experiment(status=status, is_archived=archived)
    if status == S.COMPLETED:
        experiment.ended_at = timezone.now()
        experiment.save(update_fields=["ended_at"])
    # Back-date so a write in the test is visible in updated_at.
    Experiment.objects.filter(pk=experiment.pk).update(
        updated_at=timezone.now() - timedelta(days=1)
    )
    experiment.refresh_from_db()
    return experiment


def _row(experiment: Experiment) -> dict:
    return Experiment.objects.filter(pk=experiment.pk).values().get()


def _history(experiment: Experiment) -> int:
    return LogEntry.objects.filter(object_id=str(experiment.pk)).count()


def test_matrix_covers_every_status_and_action():
    assert {status for status, _ in MATRIX} == set(S.values)
    assert all(set(row) == set(ACTIONS) for row in MATRIX.values())


@pytest.mark.django_db
@pytest.mark.parametrize(("status", "archived", "action", "expected"), CASES)
def test_status_matrix(status, archived, action, expected):
    experiment = _experiment_in(status, archived)
    before = _row(experiment)
    history_before = _history(experiment)

    if expected == "refused":
        with pytest.raises(services.TransitionRefused) as refusal:
            ACTIONS[action](experiment=experiment)
        assert f"experiment is {status}" in refusal.value.message
        assert _row(experiment) == before
        assert _history(experiment) == history_before
    elif expected == "noop":
        ACTIONS[action](experiment=experiment)
        assert _row(experiment) == before
        assert _history(experiment) == history_before
    elif expected == "deleted":
        ACTIONS[action](experiment=experiment)
        assert not Experiment.objects.filter(pk=experiment.pk).exists()
        assert not Variant.objects.filter(experiment_id=experiment.pk).exists()
        assert not VariantVersion.objects.filter(variant__experiment_id=experiment.pk).exists()
    else:
        new_status, new_archived = expected
        ACTIONS[action](experiment=experiment)
        after = _row(experiment)
        assert (after["status"], after["is_archived"]) == (new_status, new_archived)
        assert after["updated_at"] > before["updated_at"]
        assert _history(experiment) == history_before + 1


@pytest.mark.django_db
def test_refused_transition_returns_the_reason_for_staff():
    experiment = _experiment_in(S.DRAFT, False)
    with pytest.raises(services.TransitionRefused, match="only active experiments can be paused"):
        services.pause(experiment=experiment)


@pytest.mark.django_db
def test_first_activation_sets_started_at():
    experiment = make_experiment()
    assert experiment.started_at is None
    services.activate(experiment=experiment)
    experiment.refresh_from_db()
    assert experiment.started_at is not None


@pytest.mark.django_db
def test_resume_after_pause_keeps_started_at():
    experiment = make_experiment()
    services.activate(experiment=experiment)
    experiment.refresh_from_db()
    first_start = experiment.started_at
    services.pause(experiment=experiment)
    services.activate(experiment=experiment)
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE
    assert experiment.started_at == first_start


@pytest.mark.django_db
def test_completion_sets_ended_at_and_keeps_started_at():
    experiment = make_experiment()
    services.activate(experiment=experiment)
    experiment.refresh_from_db()
    first_start = experiment.started_at
    services.complete(experiment=experiment)
    experiment.refresh_from_db()
    assert experiment.ended_at is not None
    assert experiment.ended_at >= first_start
    assert experiment.started_at == first_start


@pytest.mark.django_db
def test_services_accept_a_primary_key_as_well_as_an_instance():
    experiment = make_experiment()
    services.activate(experiment=experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE


@pytest.mark.django_db
def test_transition_on_a_missing_experiment_is_a_clear_error():
    experiment = make_experiment()
    missing_pk = experiment.pk
    services.delete_experiment(experiment=experiment)
    with pytest.raises(services.ExperimentError, match="No experiment matches"):
        services.activate(experiment=missing_pk)


# --- activation validation ---------------------------------------------------


def _draft_with_variants(*version_offsets: timedelta | None, **fields) -> Experiment:
    """A draft with one variant per offset; None means the variant has no version."""
    experiment = ExperimentFactory(**fields)
    for index, offset in enumerate(version_offsets):
        variant = VariantFactory(experiment=experiment, label=f"slot-{index}")
        if offset is not None:
            VariantVersionFactory(variant=variant, effective_at=timezone.now() + offset)
    return experiment


def _assert_activation_refused(
    experiment: Experiment, match: str, error=services.TransitionRefused
):
    before = _row(experiment)
    with pytest.raises(error, match=match):
        services.activate(experiment=experiment)
    assert _row(experiment) == before


@pytest.mark.django_db
def test_activation_needs_two_variants():
    experiment = _draft_with_variants(timedelta(0))
    _assert_activation_refused(experiment, r"needs at least two slots \(has 1\)")


@pytest.mark.django_db
def test_activation_without_variants_is_refused():
    experiment = _draft_with_variants()
    _assert_activation_refused(experiment, r"needs at least two slots \(has 0\)")


@pytest.mark.django_db
def test_activation_needs_a_version_in_every_variant():
    experiment = _draft_with_variants(timedelta(0), None)
    _assert_activation_refused(experiment, "no checkpoint loaded in: slot-1")


@pytest.mark.django_db
def test_activation_ignores_a_version_that_takes_effect_in_the_future():
    experiment = _draft_with_variants(timedelta(0), timedelta(hours=1))
    _assert_activation_refused(experiment, "no checkpoint loaded in: slot-1")


@pytest.mark.django_db
@pytest.mark.parametrize("holder_status", [S.ACTIVE, S.PAUSED])
def test_activation_conflicts_with_another_routing_experiment_on_the_public_id(holder_status):
    make_experiment(status=holder_status, public_model_id="kilo/preview-shared")
    experiment = make_experiment(public_model_id="kilo/preview-shared")
    _assert_activation_refused(
        experiment,
        "another experiment is already active or paused on 'kilo/preview-shared'. "
        "Complete it first.",
        error=services.ActivationConflict,
    )


@pytest.mark.django_db
@pytest.mark.parametrize("holder_status", [S.DRAFT, S.COMPLETED])
def test_draft_and_completed_experiments_do_not_hold_the_public_id(holder_status):
    make_experiment(status=holder_status, public_model_id="kilo/preview-shared")
    experiment = make_experiment(public_model_id="kilo/preview-shared")
    services.activate(experiment=experiment)
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE


@pytest.mark.django_db
def test_resuming_a_paused_experiment_does_not_conflict_with_itself():
    experiment = make_experiment(status=S.PAUSED)
    services.activate(experiment=experiment)
    experiment.refresh_from_db()
    assert experiment.status == S.ACTIVE


@pytest.mark.django_db
def test_archived_paused_experiment_must_be_unarchived_before_activation():
    experiment = make_experiment(status=S.PAUSED, is_archived=True)
    _assert_activation_refused(experiment, "paused and archived; unarchive it first")
