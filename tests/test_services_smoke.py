import pytest

from experiments import routing_cache, services
from experiments.models import ExperimentStatus
from tests.factories import make_experiment, upstream_config


@pytest.mark.django_db
def test_activate_then_membership_contains_public_id(django_capture_on_commit_callbacks):
    exp = make_experiment()
    with django_capture_on_commit_callbacks(execute=True):
        services.activate(experiment=exp)
    exp.refresh_from_db()
    assert exp.status == ExperimentStatus.ACTIVE
    assert exp.public_model_id in routing_cache.read_membership_raw()


@pytest.mark.django_db
def test_hot_swap_reuses_ciphertext_without_key():
    exp = make_experiment()
    variant = exp.variants.first()
    before = services.current_version(variant, with_ciphertext=True)
    after = services.hot_swap(variant=variant, upstream=upstream_config(internal_id="rc-2"))
    assert after.encrypted_api_key == before.encrypted_api_key
    assert services.current_version(variant).pk == after.pk
