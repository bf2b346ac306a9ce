"""The demo producer as a process of its own: no HTTP server, stops on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from pathlib import Path

from redis.exceptions import RedisError

from .health_file import keep_fresh
from .hub import Hub
from .keys import Keys
from .producer import Producer
from .publisher import Publisher
from .redis.connections import RedisClient, open_redis
from .settings import Settings
from .startup import StartupError, producer_line
from .tasks import cancel_and_wait

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
        if settings.producer_health_file:
            beat = asyncio.create_task(keep_fresh(
                Path(settings.producer_health_file),
                settings.producer_poll_ms / 1000,
                functools.partial(_can_deliver, client, hub, producer, settings.redis_timeout_s),
            ), name="producer-health-file")  # fmt: skip
            stack.push_async_callback(cancel_and_wait, [beat])
        log.info(producer_line(settings, loop))
        await stop.wait()
        log.info("producer stopping")


async def _can_deliver(
    client: RedisClient, hub: Hub, producer: Producer, timeout_s: float
) -> bool:
    """The claim loop runs, the shared subscription (its wake-ups) is up and Redis answers."""
    if producer.problem is not None or not hub.connected:
        return False
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except (RedisError, TimeoutError):
        return False
    return True
