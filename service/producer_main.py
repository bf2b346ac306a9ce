"""The demo producer as a process of its own: no HTTP server, stops on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from .connections import open_redis
from .hub import Hub
from .keys import Keys
from .producer import Producer
from .publisher import Publisher
from .settings import Settings
from .startup import StartupError, producer_line

log = logging.getLogger(__name__)


def require_shared_redis(settings: Settings) -> None:
    """A producer alone on the embedded stand-in would run demo runs no worker can see."""
    if settings.embedded_redis:
        raise StartupError(
            "the producer needs a redis_url (SSE_REDIS_URL) shared with the workers; "
            "without one it would run against a private in-process stand-in no worker sees"
        )


async def run_producer(settings: Settings) -> None:
    """Execute demo runs until a stop signal arrives, then release everything in reverse."""
    keys = Keys(settings.key_prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        client = await open_redis(settings)
        stack.push_async_callback(client.aclose)
        hub = Hub(
            client,
            keys.hub_control,
            settings.listener_queue_size,
            timeout_s=settings.redis_timeout_s,
        )
        await hub.start()
        stack.push_async_callback(hub.close)
        publisher = Publisher(client, keys, settings.session_ttl_s, settings.log_maxlen)
        producer = Producer(client, hub, publisher=publisher, keys=keys, settings=settings)
        await producer.start()
        stack.push_async_callback(producer.close)
        log.info(producer_line(settings, loop))
        await stop.wait()
        log.info("producer stopping")
