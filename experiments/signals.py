"""Routing freshness on every routing-relevant write (SPEC §7).

The generation is bumped inside the writer's transaction, so it commits (or rolls back)
with the change itself: no gateway process can keep a copy of the old state past its next
generation check, wherever the change came from. The Redis membership is rewritten after
the commit, so workers find the new state there instead of each asking the database.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from experiments import routing_cache
from experiments.models import Experiment, Variant, VariantVersion


@receiver(post_save, sender=Experiment)
@receiver(post_delete, sender=Experiment)
@receiver(post_save, sender=Variant)
@receiver(post_delete, sender=Variant)
@receiver(post_save, sender=VariantVersion)
def routing_changed(sender, **kwargs) -> None:
    routing_cache.bump_generation()
    transaction.on_commit(routing_cache.refresh)
