"""Print a fresh BYOK_ENCRYPTION_KEY (base64 of 32 random bytes) and nothing else.

Scripts use it as ``export BYOK_ENCRYPTION_KEY="$(python manage.py generate_encryption_key)"``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from experiments import crypto


class Command(BaseCommand):
    help = "Print a fresh base64 32-byte key for BYOK_ENCRYPTION_KEY (nothing else on stdout)."
    # Generating a key needs neither the database nor a valid configuration.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(crypto.generate_key())
