"""Two activations on one public id: the partial unique index decides (SPEC §3).

The pre-check gives the friendly message; the database is the authority, and a
race that slips past the pre-check must end in the same ActivationConflict,
never in an IntegrityError or a server error.
"""

from __future__ import annotations

import threading

import pytest
from django.db import connections

from experiments import services
from experiments.models import Experiment, ExperimentStatus
from tests.conftest import requires_postgres
from tests.factories import make_experiment

S = ExperimentStatus
ROUNDS = 5


def _conflict_message(public_model_id: str) -> str:
    return (
        f"Cannot activate: another experiment is already active or paused on "
        f"{public_model_id!r}. Complete it first."
    )


def _activate_concurrently(experiment_ids: list) -> dict:
    """Activate each experiment in its own thread and connection, all released at once."""
    barrier = threading.Barrier(len(experiment_ids))
    outcomes: dict = {}

    def run(pk) -> None:
        try:
            barrier.wait(timeout=30)
            services.activate(experiment=pk)
            outcomes[pk] = "activated"
        except Exception as exc:  # recorded and asserted on by the test
            outcomes[pk] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(pk,)) for pk in experiment_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def _assert_one_winner_and_one_friendly_conflict(public_model_id: str, outcomes: dict) -> None:
    winners = [pk for pk, outcome in outcomes.items() if outcome == "activated"]
    losers = [outcome for outcome in outcomes.values() if outcome != "activated"]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1, outcomes
    assert type(losers[0]) is services.ActivationConflict, repr(losers[0])
    assert str(losers[0]) == _conflict_message(public_model_id)
    statuses = dict(
        Experiment.objects.filter(public_model_id=public_model_id).values_list("pk", "status")
    )
    assert statuses[winners[0]] == S.ACTIVE
    assert sorted(statuses.values()) == [S.ACTIVE, S.DRAFT]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_activations_leave_exactly_one_active_and_one_friendly_conflict():
    for round_number in range(ROUNDS):
        public_model_id = f"kilo/preview-race-{round_number}"
        drafts = [make_experiment(public_model_id=public_model_id) for _ in range(2)]
        outcomes = _activate_concurrently([draft.pk for draft in drafts])
        _assert_one_winner_and_one_friendly_conflict(public_model_id, outcomes)


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_activations_past_a_blind_pre_check_are_decided_by_the_unique_index(
    monkeypatch,
):
    # Both threads pass the pre-check, so both reach the UPDATE: the index decides.
    monkeypatch.setattr(services, "_public_id_held_by_another", lambda experiment: False)
    for round_number in range(ROUNDS):
        public_model_id = f"kilo/preview-blind-race-{round_number}"
        drafts = [make_experiment(public_model_id=public_model_id) for _ in range(2)]
        outcomes = _activate_concurrently([draft.pk for draft in drafts])
        _assert_one_winner_and_one_friendly_conflict(public_model_id, outcomes)


@pytest.mark.django_db
def test_unique_index_violation_becomes_the_same_friendly_conflict(monkeypatch):
    holder = make_experiment(status=S.ACTIVE, public_model_id="kilo/preview-taken")
    experiment = make_experiment(public_model_id="kilo/preview-taken")
    monkeypatch.setattr(services, "_public_id_held_by_another", lambda experiment: False)

    with pytest.raises(services.ActivationConflict) as conflict:
        services.activate(experiment=experiment)

    assert str(conflict.value) == _conflict_message("kilo/preview-taken")
    experiment.refresh_from_db()
    holder.refresh_from_db()
    assert (experiment.status, experiment.started_at) == (S.DRAFT, None)
    assert holder.status == S.ACTIVE
