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
from .redis.connections import RedisClient, open_redis
from .settings import Settings
from .startup import StartupError, producer_line
from .tasks import cancel_and_wait
from .wiring import open_core

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
        core = await stack.enter_async_context(
            open_core(settings, keys, open_redis, with_producer=True)
        )
        client, hub, producer = core.redis, core.hub, core.producer
        if producer is None:  # with_producer always makes one; this tells the type checker
            raise StartupError("the demo producer did not start")
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


async def _can_deliver(client: RedisClient, hub: Hub, producer: Producer, timeout_s: float) -> bool:
    """The claim loop runs, the shared subscription (its wake-ups) is up and Redis answers."""
    if producer.problem is not None or not hub.connected:
        return False
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except (RedisError, TimeoutError):
        return False
    return True
