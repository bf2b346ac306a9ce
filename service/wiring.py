"""What a worker and a stand-alone producer are both made of, built and opened in one place.

Either process holds one Redis client, the shared subscription over it and the publisher;
the producer process, and a worker with the embedded producer, also run the demo producer.
They open in dependency order and close in reverse, whatever fails on the way.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .hub import Hub
from .keys import Keys
from .producer import Producer
from .publisher import Publisher
from .redis.connections import RedisClient, RedisOpener
from .settings import Settings


@dataclass(frozen=True, slots=True)
class Core:
    """The opened objects; `producer` only when asked for."""

    redis: RedisClient
    hub: Hub
    publisher: Publisher
    producer: Producer | None


@contextlib.asynccontextmanager
async def open_core(
    settings: Settings, keys: Keys, open_client: RedisOpener, *, with_producer: bool
) -> AsyncIterator[Core]:
    """Open the client, start the shared subscription (and the producer); close on exit."""
    async with contextlib.AsyncExitStack() as stack:
        client = await open_client(settings)
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
        producer = None
        if with_producer:
            producer = Producer(client, hub, publisher=publisher, keys=keys, settings=settings)
            await producer.start()
            stack.push_async_callback(producer.close)
        yield Core(client, hub, publisher, producer)
