"""ASGI entry point: ``uvicorn config.asgi:application``.

Django does not speak the ASGI lifespan protocol, so a small wrapper answers it:
on shutdown it flushes pending usage writes and closes the shared upstream and
Redis clients, so a graceful stop loses no usage row.
"""

import asyncio
import logging
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

django_application = get_asgi_application()

logger = logging.getLogger("gateway.lifespan")

#: Upper bound on how long shutdown waits for usage writes.
SHUTDOWN_FLUSH_SECONDS = 30.0


async def _shutdown() -> None:
    from gateway.routing import router
    from gateway.upstream_client import shared_client
    from gateway.usage import writer

    await shared_client.aclose()
    await router.store.aclose()
    flushed = await asyncio.to_thread(writer.flush, SHUTDOWN_FLUSH_SECONDS)
    if not flushed:
        logger.error("shutdown: %d usage records were not written", writer.pending())


async def lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await _shutdown()
            except Exception:
                logger.exception("shutdown cleanup failed")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    else:
        await django_application(scope, receive, send)
