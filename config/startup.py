"""Checks a server process runs once before it serves (``config/asgi.py``, ``config/wsgi.py``).

Management commands skip them on purpose: ``manage.py generate_encryption_key`` or
``migrate`` must work on a fresh checkout before anything is configured.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger("config.startup")


def check_server_settings() -> None:
    """Refuse to serve on the development SECRET_KEY; name an unusable encryption key."""
    if not settings.DEBUG and settings.SECRET_KEY == settings.DEVELOPMENT_SECRET_KEY:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set: a server with DEBUG off refuses to start on the published "
            "development key (anyone could forge its sessions and CSRF tokens). Set SECRET_KEY "
            "to a long random value, or DEBUG=true on a developer's machine."
        )
    from experiments import crypto

    try:
        crypto.check_key()
    except crypto.EncryptionKeyError as exc:
        # Not fatal: ids without an experiment still serve, experimented ones answer 503.
        logger.error("%s Experimented model ids answer 503 until this is fixed.", exc)
