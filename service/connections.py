"""Open the Redis client: the real server from `redis_url`, or an in-process stand-in."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, TypeGuard

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .logs import redacted_url
from .settings import Settings
from .startup import StartupError

log = logging.getLogger(__name__)

Redis = redis.Redis
# A worker talks to one server or to a Redis Cluster; both clients offer what it uses.
RedisClient = redis.Redis | RedisCluster


def pipelines_queue(client: RedisClient) -> TypeGuard[redis.Redis]:
    """Whether `client` may batch commands in a pipeline that waits for a free connection.

    True on a single server (and the in-process stand-in). redis-py's cluster pipelines take
    connections without waiting and fail when a node's pool is busy, so on a cluster
    commands go one by one, through the queue of `QueueingRedisCluster`.
    """
    return isinstance(client, redis.Redis)


class RedisOpener(Protocol):
    """Opens the client a worker uses; `open_redis` in production, a shared fake in tests."""

    async def __call__(self, settings: Settings, /) -> RedisClient: ...

CONNECT_ATTEMPTS = 5


async def open_redis(settings: Settings) -> RedisClient:
    """A connected client; retries a few times so a worker can start just before Redis does.

    Raises StartupError, one line naming the (redacted) URL and the last error, when Redis
    does not answer after CONNECT_ATTEMPTS tries.
    """
    if settings.embedded_redis:
        return _embedded_redis()
    client = _cluster_client(settings) if settings.redis_cluster else _server_client(settings)
    url = redacted_url(settings.redis_url)
    attempt, delay_s, waited_s = 1, 0.2, 0.0
    while True:
        try:
            await client.ping()
        except _UNREACHABLE as error:
            if attempt == CONNECT_ATTEMPTS:
                await client.aclose()
                raise StartupError(
                    f"cannot reach redis at {url} ({attempt} attempts over {waited_s:.1f}s): "
                    f"{_one_line(error)}"
                ) from error
            # Quiet while retrying: a failure ends in the one line above, a success in the
            # process's start-up line.
            log.debug("redis at %s not reachable (attempt %d/%d): %s; retrying in %.1fs",
                      url, attempt, CONNECT_ATTEMPTS, error, delay_s)
            await asyncio.sleep(delay_s)
            attempt, waited_s, delay_s = attempt + 1, waited_s + delay_s, delay_s * 2
        except RedisError as error:
            await client.aclose()
            raise StartupError(f"redis at {url} refused the worker: {_one_line(error)}") from error
        else:
            log.debug("connected to %s", url)
            return client


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, ClusterDownError)


def _server_client(settings: Settings) -> Redis:
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
    return redis.Redis.from_pool(pool)


class QueueingRedisCluster(RedisCluster):
    """redis-py's cluster client, with commands queueing for a connection.

    Its per-node pools raise MaxConnectionsError when full instead of waiting (unlike
    BlockingConnectionPool on one server), so a burst of requests would fail. A semaphore
    of the same size makes them wait their turn; the per-node pools then never run dry.
    """

    def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self._in_flight = asyncio.Semaphore(max_connections)
        self._resets = 0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._in_flight:
            resets = self._resets
            try:
                return await super().execute_command(*args, **kwargs)
            except (AttributeError, RuntimeError) as error:
                # TODO(redis>8.1): when a node answers CLUSTERDOWN, redis-py (8.1.0) resets
                # the whole client, closing the connections of commands in flight too. One
                # caught in its handshake fails on its vanished writer (AttributeError) or,
                # on uvloop, its closed transport (RuntimeError): a lost connection, which
                # callers answer as one (503, retry), not a bug to report as a 500.
                if self._resets == resets:
                    raise
                raise RedisConnectionError(f"connection closed by a reset: {error}") from error

    async def aclose(self) -> None:
        """Close every connection (redis-py also calls this itself on CLUSTERDOWN)."""
        self._resets += 1
        await super().aclose()


def _cluster_client(settings: Settings) -> RedisCluster:
    # redis-py's cluster client keeps a pool per node and follows MOVED/ASK itself.
    return QueueingRedisCluster.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )


def _embedded_redis() -> Redis:
    # Imported here so a deployment against real Redis never loads the stand-in.
    import fakeredis  # noqa: PLC0415

    client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return client
