"""Open the Redis client from `redis_url`: one server, a Redis Cluster, the primary a set of
Redis Sentinels names, or (no URL) an in-process stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
from collections.abc import Iterator
from typing import Any, Protocol, TypeGuard

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..logs import redacted_url
from ..sentinel_url import is_sentinel_url, parse_sentinel_url
from ..settings import Settings, StartupError

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
    client = _client(settings)
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
            log.debug(
                "redis at %s not reachable (attempt %d/%d): %s; retrying in %.1fs",
                url,
                attempt,
                CONNECT_ATTEMPTS,
                error,
                delay_s,
            )
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


def _client(settings: Settings) -> RedisClient:
    if settings.redis_cluster:
        return _cluster_client(settings)
    if is_sentinel_url(settings.redis_url):
        return _sentinel_client(settings)
    return _server_client(settings)


def _retry() -> Retry:
    return Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=2)


def _server_client(settings: Settings) -> Redis:
    # A blocking pool: a burst of requests queues for a connection instead of opening one
    # each, so the worker's Redis connection count stays fixed whatever the client count.
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=_retry(),
        health_check_interval=30,
    )
    return redis.Redis.from_pool(pool)


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the Sentinels name, refused unless the server is one.

    Every (re)connect asks the Sentinels for the primary's address. Around a failover one of
    them may still name the former primary, which may already be a replica: it would refuse
    writes and serve stale reads, and a subscription there may hear nothing. ROLE settles it
    before the connection is used; the pool then asks the Sentinels again.
    """

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        await self.send_command("ROLE", check_health=False)
        role = await self.read_response()
        name = role[0].decode() if isinstance(role, list) and role else repr(role)
        if name != "master":
            raise RedisConnectionError(
                f"{self.host}:{self.port} is a {name}, not the primary; asking the Sentinels again"
            )


class BlockingSentinelConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool, waiting for a free connection like the single-server pool.

    SentinelConnectionPool builds on the pool that raises when full; mixing in the blocking
    pool keeps the worker's connection count fixed whatever the request rate. When the
    Sentinels name a new primary, the pool drops its idle connections to the old one; a
    connection that was in use at that moment is dropped here, when it comes back, so no
    command goes on to a former primary that may still accept writes it will lose.
    """

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._released = asyncio.Condition()

    async def release(self, connection: AbstractConnection) -> None:
        primary = self.master_address
        moved = primary is not None and _address(connection) != _address_of(primary)
        if moved and connection.is_connected:
            await connection.disconnect()
        await super().release(connection)
        async with self._released:
            self._released.notify_all()

    async def wait_for_commands_at(
        self, address: tuple[str, int], keep: AbstractConnection, timeout_s: float
    ) -> None:
        """Until no connection to `address` other than `keep` is in use (at most `timeout_s`).

        A command already sent to a former primary is answered there, and an event it
        publishes reaches only the subscribers still there.
        """

        def answered() -> bool:
            # `_in_use_connections` is private in redis-py (checked against 8.0 and 8.1).
            in_use = self._in_use_connections
            return not any(c is not keep and _address(c) == address for c in in_use)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._released:
                await self._released.wait_for(answered)


def _address(connection: AbstractConnection) -> tuple[str, int] | None:
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return None if host is None or port is None else (str(host), int(port))


def _address_of(address: Any) -> tuple[str, int]:
    host, port = address
    return str(host), int(port)


class SentinelRedis(redis.Redis):
    """A client of the primary the Sentinels name; closing it closes its Sentinel clients."""

    _sentinels: Sentinel | None = None

    @classmethod
    def over(cls, pool: BlockingSentinelConnectionPool, sentinels: Sentinel) -> SentinelRedis:
        """A client owning `pool` (as `from_pool` makes) and the `sentinels` it asks."""
        client = cls(connection_pool=pool)
        client.auto_close_connection_pool = True
        client._sentinels = sentinels
        return client

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self._sentinels is not None:
                await self._sentinels.aclose()


def _sentinel_client(settings: Settings) -> SentinelRedis:
    # redis-py's Sentinel support: each new connection asks the Sentinels where the primary
    # is (SentinelManagedConnection), and a write refused as READONLY by a demoted primary
    # drops the connection, so the retry below reconnects to the new one.
    address = parse_sentinel_url(settings.redis_url)
    timeouts = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(address.sentinels),
        sentinel_kwargs={
            **timeouts,
            "username": address.sentinel_username,
            "password": address.sentinel_password,
        },
    )
    pool = BlockingSentinelConnectionPool(
        address.service_name,
        sentinels,
        connection_class=PrimaryConnection,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        db=address.db,
        username=address.username,
        password=address.password,
        retry=_retry(),
        health_check_interval=30,
        **timeouts,
    )
    return SentinelRedis.over(pool, sentinels)


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

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        """Read the slot table if it is not known (first use, or after a connection error).

        Every command does this first, outside redis-py's error handling, so a cluster no
        node of which answers would fail the command with a RedisClusterException.
        """
        with cluster_unreachable_as_connection_error():
            return await super().initialize(*args, **kwargs)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._in_flight:
            resets = self._resets
            try:
                return await super().execute_command(*args, **kwargs)
            except (AttributeError, RuntimeError) as error:
                # TODO(redis>8.1): when a node answers CLUSTERDOWN, redis-py (8.1.0) resets
                # the whole client, closing the connections of commands in flight too; after
                # a connection error or a slot-table refresh (a failover) it also closes a
                # node's idle connections while a command may just have taken one. A command
                # caught in its handshake fails on its vanished writer (AttributeError) or,
                # on uvloop, its closed transport (RuntimeError): a lost connection, which
                # callers answer as one (503, retry), not a bug to report as a 500.
                if self._resets == resets and not closed_under_us(error):
                    raise
                raise RedisConnectionError(f"connection closed by a reset: {error}") from error

    # redis-py sends these through a cluster pipeline (one command per slot, even for one
    # key), past the queue and the guard above; one command per slot here keeps both.

    async def exists(self, *keys: Any) -> int:
        return await self._per_slot("EXISTS", keys)

    async def delete(self, *keys: Any) -> int:
        return await self._per_slot("DEL", keys)

    async def unlink(self, *keys: Any) -> int:
        return await self._per_slot("UNLINK", keys)

    async def touch(self, *keys: Any) -> int:
        return await self._per_slot("TOUCH", keys)

    async def _per_slot(self, command: str, keys: tuple[Any, ...]) -> int:
        by_slot: dict[int, list[Any]] = {}
        for key in keys:
            by_slot.setdefault(self.keyslot(key), []).append(key)
        total = 0
        for slot_keys in by_slot.values():
            total += int(await self.execute_command(command, *slot_keys))
        return total

    async def aclose(self) -> None:
        """Close every connection (redis-py also calls this itself on CLUSTERDOWN)."""
        self._resets += 1
        await super().aclose()


class ClusterUnreachableError(RedisConnectionError):
    """No node of the cluster answered for its slot table: Redis is out of reach for now."""


@contextlib.contextmanager
def cluster_unreachable_as_connection_error() -> Iterator[None]:
    """Raise redis-py's failure to read the slot table as the outage it is.

    redis-py raises RedisClusterException, which is not a RedisError, when no node answers
    (all of them paused, restarting, cut off) or their slot tables disagree or leave slots
    uncovered. Every caller answers a Redis outage (a 503, a postponed resync, a retried
    topology check); it would miss this one and fail as a bug instead.
    """
    try:
        yield
    except RedisClusterException as error:
        raise ClusterUnreachableError(str(error)) from error


def closed_under_us(error: BaseException) -> bool:
    """Whether `error` is redis-py's connection code failing on a socket closed meanwhile.

    Its reader and writer become None when another task disconnects the connection; the
    failing line is then in redis-py's connection module, on None. Anywhere else, or on
    anything but None, the same exception is a bug and stays one.
    """
    if isinstance(error, AttributeError) and error.obj is not None:
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.endswith(_REDIS_CONNECTION_MODULE)


_REDIS_CONNECTION_MODULE = os.path.join("redis", "asyncio", "connection.py")


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
