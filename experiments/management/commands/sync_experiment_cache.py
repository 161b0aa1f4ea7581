"""Rebuild the routing caches (membership and every payload) from the database.

For operators after a Redis flush or outage; the caches otherwise heal on the
next routing-relevant change.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import RedisError

from experiments import routing_cache
from experiments.management.output import JsonCommand


class Command(JsonCommand):
    help = "Rebuild the Redis routing membership and payloads from the database."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            summary = routing_cache.sync_all()
        except (ConnectionInterrupted, RedisError, OSError) as exc:
            # The cache location is not printed: a REDIS_URL may carry a password.
            reason = type(exc.__cause__ or exc).__name__
            raise CommandError(
                f"Cannot reach the cache (Redis) to rebuild the routing cache ({reason}); "
                "check REDIS_URL and that Redis is running, then run this command again."
            ) from None
        self.emit(
            f"Routing cache rebuilt: {summary['public_ids']} public id(s) with an active or "
            f"paused experiment; membership generation {summary['generation']}.",
            summary,
        )
