"""What an app owns, under typed keys, and the cleanup contexts that open and close it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis

from .connections import RedisOpener
from .hub import Hub
from .keys import Keys
from .producer import Producer
from .publisher import Publisher
from .sessions import SessionStore
from .settings import Settings

settings_key = web.AppKey("settings_key", Settings)
redis_opener_key = web.AppKey("redis_opener_key", RedisOpener)
keys_key = web.AppKey("keys_key", Keys)
redis_key = web.AppKey("redis_key", Redis)
hub_key = web.AppKey("hub_key", Hub)
sessions_key = web.AppKey("sessions_key", SessionStore)
publisher_key = web.AppKey("publisher_key", Publisher)
producer_key = web.AppKey("producer_key", Producer)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis client, plus the stores that share it."""
    settings = app[settings_key]
    keys = app[keys_key]
    client = await app[redis_opener_key](settings)
    app[redis_key] = client
    app[sessions_key] = SessionStore(client, keys, settings.session_ttl_s)
    app[publisher_key] = Publisher(client, keys, settings.session_ttl_s, settings.log_maxlen)
    yield
    await client.aclose()


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """The worker's shared subscription."""
    hub = Hub(app[redis_key], app[keys_key].hub_control, app[settings_key].listener_queue_size)
    await hub.start()
    app[hub_key] = hub
    yield
    await hub.close()


async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
    """The in-process demo producer (only when `producer = "embedded"`)."""
    producer = Producer(
        app[redis_key],
        app[hub_key],
        publisher=app[publisher_key],
        keys=app[keys_key],
        settings=app[settings_key],
    )
    await producer.start()
    app[producer_key] = producer
    yield
    await producer.close()
