"""Make every gateway process reload routing from the database now.

Moves the routing generation on, so every process drops its copies at its next check
(within ``GATEWAY_MEMBERSHIP_TTL_SECONDS``), and with Redis rebuilds the shared membership
and payloads under the new generation. Useful after rows were edited by hand; after a Redis
flush or restore nothing is needed, since workers reject data of another generation.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import RedisError

from experiments import routing_cache


class Command(BaseCommand):
    help = (
        "Make every gateway process reload routing from the database, and rebuild the "
        "Redis routing cache when there is one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        shared_cache = bool(settings.REDIS_URL)
        try:
            if shared_cache:
                summary = routing_cache.sync_all()
            else:
                summary = {"generation": routing_cache.start_new_generation().number}
        except (ConnectionInterrupted, RedisError, OSError) as exc:
            # The cache location is not printed: a REDIS_URL may carry a password.
            reason = type(exc.__cause__ or exc).__name__
            raise CommandError(
                f"Cannot reach the cache (Redis) to rebuild the routing cache ({reason}); "
                "gateway processes load routing from the database meanwhile. Check REDIS_URL "
                "and that Redis is running, then run this command again."
            ) from None
        except DatabaseError as exc:
            raise CommandError(
                f"Cannot reach the database ({type(exc).__name__}); nothing was changed. "
                "Check DATABASE_URL and that the database is running."
            ) from None
        if options["json"]:
            self.stdout.write(json.dumps({"ok": True, "shared_cache": shared_cache, **summary}))
            return
        interval = settings.GATEWAY_MEMBERSHIP_TTL_SECONDS
        if not shared_cache:
            self.stdout.write(
                "No shared routing cache to rebuild: REDIS_URL is unset, so each gateway "
                "process keeps its own copy. Routing generation moved to "
                f"{summary['generation']}: every gateway process reloads routing from the "
                f"database within {interval:g} s."
            )
            return
        self.stdout.write(
            f"Routing cache rebuilt: {summary['public_ids']} public id(s) with an active or "
            f"paused experiment; routing generation {summary['generation']}. Every gateway "
            f"process reloads routing within {interval:g} s."
        )
