"""Every lifecycle change, hot-swap and rotation is recorded with who and when (SPEC §3).

The record is django.contrib.admin's LogEntry, so the admin's History page shows it.
"""

from __future__ import annotations

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.utils import timezone

from experiments import services
from experiments.models import Experiment, ExperimentStatus
from tests.factories import StaffUserFactory, make_experiment, upstream_config

S = ExperimentStatus


def _entries(experiment: Experiment):
    return LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(Experiment), object_id=str(experiment.pk)
    ).order_by("action_time", "id")


def _variant(experiment: Experiment):
    return experiment.variants.get(label="slot-a")


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # The staff users here never log in; PBKDF2 would only slow the suite down.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


#: (starting status, service, extra kwargs builder, words the entry must contain)
RECORDED_CHANGES = [
    pytest.param(S.DRAFT, services.activate, lambda e: {}, "Activated", id="activate"),
    pytest.param(S.ACTIVE, services.pause, lambda e: {}, "Paused", id="pause"),
    pytest.param(S.PAUSED, services.activate, lambda e: {}, "Resumed", id="resume"),
    pytest.param(S.ACTIVE, services.complete, lambda e: {}, "Completed", id="complete"),
    pytest.param(S.COMPLETED, services.archive, lambda e: {}, "Archived", id="archive"),
    pytest.param(
        S.ACTIVE,
        services.hot_swap,
        lambda e: {"variant": _variant(e), "upstream": upstream_config(internal_id="rc-9")},
        "Hot-swapped variant 'slot-a' to 'rc-9'",
        id="hot-swap",
    ),
    pytest.param(
        S.ACTIVE,
        services.rotate_key,
        lambda e: {"variant": _variant(e), "api_key": "sk-rotated"},
        "Rotated the key of variant 'slot-a'",
        id="rotate-key",
    ),
]


def _call(service, experiment: Experiment, extra: dict, by) -> None:
    kwargs = extra or {"experiment": experiment}
    service(**kwargs, by=by)


@pytest.mark.django_db
@pytest.mark.parametrize(("status", "service", "extra", "words"), RECORDED_CHANGES)
def test_change_is_recorded_with_the_acting_user_and_time(status, service, extra, words):
    experiment = make_experiment(status=status)
    staff = StaffUserFactory()
    before = timezone.now()

    _call(service, experiment, extra(experiment), by=staff)

    (entry,) = _entries(experiment)
    assert entry.user == staff
    assert before <= entry.action_time <= timezone.now()
    assert entry.action_flag == CHANGE
    assert words in entry.change_message


@pytest.mark.django_db
@pytest.mark.parametrize(("status", "service", "extra", "words"), RECORDED_CHANGES)
def test_change_without_an_actor_is_recorded_as_the_service_user(status, service, extra, words):
    experiment = make_experiment(status=status)

    _call(service, experiment, extra(experiment), by=None)

    (entry,) = _entries(experiment)
    assert entry.user.username == "manage.py"


@pytest.mark.django_db
def test_service_user_cannot_log_in():
    user = services.service_user()
    assert not user.is_active
    assert not user.has_usable_password()
    assert services.service_user().pk == user.pk


@pytest.mark.django_db
def test_unarchive_is_recorded():
    experiment = make_experiment(status=S.COMPLETED, is_archived=True)
    staff = StaffUserFactory()
    services.unarchive(experiment=experiment, by=staff)
    (entry,) = _entries(experiment)
    assert (entry.user, entry.change_message) == (staff, "Unarchived.")


@pytest.mark.django_db
def test_creation_is_recorded_as_an_addition():
    staff = StaffUserFactory()
    experiment = services.create_experiment(
        public_model_id="kilo/preview-new", name="New", by=staff
    )
    (entry,) = _entries(experiment)
    assert (entry.user, entry.action_flag) == (staff, ADDITION)
    assert experiment.created_by == staff


@pytest.mark.django_db
def test_deletion_of_a_draft_is_recorded_and_outlives_the_row():
    experiment = make_experiment()
    staff = StaffUserFactory()
    services.delete_experiment(experiment=experiment, by=staff)
    (entry,) = _entries(experiment)
    assert (entry.user, entry.action_flag) == (staff, DELETION)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("status", "archived", "service"),
    [
        (S.ACTIVE, False, services.activate),
        (S.PAUSED, False, services.pause),
        (S.COMPLETED, False, services.complete),
        (S.COMPLETED, True, services.archive),
        (S.COMPLETED, False, services.unarchive),
    ],
    ids=["activate", "pause", "complete", "archive", "unarchive"],
)
def test_idempotent_repeat_records_nothing(status, archived, service):
    experiment = make_experiment(status=status, is_archived=archived)
    service(experiment=experiment, by=StaffUserFactory())
    assert not _entries(experiment).exists()


@pytest.mark.django_db
def test_unchanged_edits_record_nothing():
    experiment = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-same")
    variant = _variant(experiment)
    staff = StaffUserFactory()
    services.update_experiment(experiment=experiment, public_model_id="kilo/preview-same", by=staff)
    services.rename_variant(variant=variant, label=variant.label, by=staff)
    services.set_variant_weight(variant=variant, weight=variant.weight, by=staff)
    assert not _entries(experiment).exists()


@pytest.mark.django_db
def test_refused_transition_records_nothing():
    experiment = make_experiment(status=S.COMPLETED)
    with pytest.raises(services.TransitionRefused):
        services.activate(experiment=experiment, by=StaffUserFactory())
    assert not _entries(experiment).exists()


@pytest.mark.django_db
def test_history_entry_never_holds_the_key(canary_key):
    experiment = make_experiment()
    services.hot_swap(variant=_variant(experiment), upstream=upstream_config(), api_key=canary_key)
    services.rotate_key(variant=_variant(experiment), api_key=canary_key)
    assert all(
        canary_key not in entry.change_message and canary_key not in entry.object_repr
        for entry in _entries(experiment)
    )
