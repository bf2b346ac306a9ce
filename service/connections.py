"""Open the Redis client: the real server from `redis_url`, or an in-process stand-in."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings

log = logging.getLogger(__name__)

Redis = redis.Redis


class RedisOpener(Protocol):
    """Opens the client a worker uses; `open_redis` in production, a shared fake in tests."""

    async def __call__(self, settings: Settings, /) -> Redis: ...

CONNECT_ATTEMPTS = 5


async def open_redis(settings: Settings) -> Redis:
    """A connected client; retries a few times so a worker can start just before Redis does."""
    if settings.embedded_redis:
        return _embedded_redis()
    # A blocking pool: a burst of requests queues for a connection instead of opening one
    # each, so the worker's Redis connection count stays fixed whatever the client count.
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=2),
        health_check_interval=30,
    )
    client: Redis = redis.Redis.from_pool(pool)
    delay_s = 0.2
    for attempt in range(1, CONNECT_ATTEMPTS):
        try:
            await client.ping()
            break
        except (RedisConnectionError, RedisTimeoutError) as error:
            log.warning(
                "redis at %s not reachable (attempt %d/%d): %s; retrying in %.1fs",
                _redacted(settings.redis_url),
                attempt,
                CONNECT_ATTEMPTS,
                error,
                delay_s,
            )
            await asyncio.sleep(delay_s)
            delay_s *= 2
    else:
        try:
            await client.ping()
        except (RedisConnectionError, RedisTimeoutError):
            await client.aclose()
            raise
    log.info("connected to redis at %s", _redacted(settings.redis_url))
    return client


def _embedded_redis() -> Redis:
    # Imported here so a deployment against real Redis never loads the stand-in.
    import fakeredis  # noqa: PLC0415

    log.warning(
        "no redis_url configured: using the embedded in-process Redis stand-in "
        "(single worker only; state is lost on exit)"
    )
    client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return client


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"
