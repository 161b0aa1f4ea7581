"""Routing cache invalidation, run after the transaction commits (SPEC §7)."""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from experiments import routing_cache
from experiments.models import Experiment, Variant, VariantVersion


def _refresh_on_commit(*public_model_ids: str | None) -> None:
    ids = {pid for pid in public_model_ids if pid}
    transaction.on_commit(lambda: routing_cache.refresh(ids))


@receiver(post_save, sender=Experiment)
@receiver(post_delete, sender=Experiment)
def experiment_changed(sender, instance: Experiment, **kwargs) -> None:
    _refresh_on_commit(instance.public_model_id, getattr(instance, "_loaded_public_model_id", None))
    instance._loaded_public_model_id = instance.public_model_id


@receiver(post_save, sender=Variant)
@receiver(post_delete, sender=Variant)
def variant_changed(sender, instance: Variant, **kwargs) -> None:
    public_model_id = (
        Experiment.objects.filter(pk=instance.experiment_id)
        .values_list("public_model_id", flat=True)
        .first()
    )
    _refresh_on_commit(public_model_id)


@receiver(post_save, sender=VariantVersion)
def version_changed(sender, instance: VariantVersion, **kwargs) -> None:
    public_model_id = (
        Experiment.objects.filter(variants__pk=instance.variant_id)
        .values_list("public_model_id", flat=True)
        .first()
    )
    _refresh_on_commit(public_model_id)
