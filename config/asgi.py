"""ASGI entry point: ``uvicorn config.asgi:application``.

Two Django handlers over the same URLconf: the gateway endpoints (``/v1/...``,
``/healthz``, ``/readyz``) go to ``GatewayASGIHandler``, which skips the admin's
session/auth/CSRF/messages middleware (see config/gateway_handler.py for why);
everything else goes to Django's usual handler with the full ``settings.MIDDLEWARE``.

Django does not speak the ASGI lifespan protocol, so a small wrapper answers it:
on startup it opens the usage spool (and so adopts the segments of a process that
died); on shutdown it writes pending usage records (to the database, or leaves them
in the spool when the database is away) and closes the shared upstream and Redis
clients, so a graceful stop loses no usage row.
"""

import asyncio
import logging
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# get_asgi_application() runs django.setup(); the gateway handler is built after it.
django_application = get_asgi_application()

from config.gateway_handler import GatewayASGIHandler, is_gateway_path  # noqa: E402
from config.startup import check_server_settings  # noqa: E402

check_server_settings()

logger = logging.getLogger("gateway.lifespan")

#: Upper bound on how long shutdown waits for usage writes.
SHUTDOWN_FLUSH_SECONDS = 30.0


async def _startup() -> None:
    from gateway.usage import writer

    await asyncio.to_thread(writer.start)


async def _shutdown() -> None:
    from gateway.routing import router
    from gateway.upstream_client import shared_client
    from gateway.usage import writer

    await shared_client.aclose()
    await router.aclose()
    flushed = await asyncio.to_thread(writer.stop, SHUTDOWN_FLUSH_SECONDS)
    if not flushed:
        logger.error("shutdown: %d usage records not yet spooled or written", writer.pending())


async def lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await _startup()
            except Exception:
                logger.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": "startup failed"})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await _shutdown()
            except Exception:
                logger.exception("shutdown cleanup failed")
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_application(admin_handler, gateway_handler):
    """The ASGI callable: lifespan, then dispatch by path to one of the two handlers."""

    async def application(scope, receive, send):
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http" and is_gateway_path(scope):
            await gateway_handler(scope, receive, send)
        else:
            await admin_handler(scope, receive, send)

    return application


gateway_application = GatewayASGIHandler()
application = build_application(django_application, gateway_application)
