"""The Sentinel client's pool: it reaches only a primary, and leaves a former one behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.redis.connections import BlockingSentinelConnectionPool, PrimaryConnection

from redis_process import RedisProcess, replica_linked_to, require_redis_server, wait_until

pytestmark = pytest.mark.redis


class StubSentinels:
    """Names whatever address a test sets as the primary, as a stale Sentinel might."""

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)

    def name(self, server: RedisProcess) -> None:
        self.address = ("127.0.0.1", server.port)

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        del service_name
        return self.address


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    """Two independent primaries, as before and after a failover."""
    started = [RedisProcess(require_redis_server(), tmp_path / f"s{n}") for n in range(2)]
    try:
        for server in started:
            server.start()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


@pytest.fixture
async def pool_and_sentinels(
    servers: tuple[RedisProcess, RedisProcess],
) -> AsyncIterator[tuple[BlockingSentinelConnectionPool, StubSentinels]]:
    sentinels = StubSentinels(servers[0].port)
    pool = BlockingSentinelConnectionPool(
        "svc", sentinels, connection_class=PrimaryConnection, max_connections=2, timeout=2
    )
    yield pool, sentinels
    await pool.disconnect()


async def test_a_replica_named_as_primary_is_refused_and_the_sentinels_asked_again(
    servers: tuple[RedisProcess, RedisProcess],
    pool_and_sentinels: tuple[BlockingSentinelConnectionPool, StubSentinels],
    tmp_path: Path,
) -> None:
    primary, _ = servers
    pool, sentinels = pool_and_sentinels
    replica = RedisProcess(
        require_redis_server(),
        tmp_path / "replica",
        extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
    )
    replica.start()
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: replica_linked_to(replica.port) is not None,
            "the replica is linked",
            10.0,
        )
        sentinels.name(replica)
        with pytest.raises(RedisConnectionError, match="is a slave, not the primary"):
            await pool.get_connection()
        sentinels.name(primary)
        connection = await pool.get_connection()
        assert connection.port == primary.port
        await pool.release(connection)
    finally:
        replica.stop()


async def test_a_connection_in_use_when_the_primary_changes_is_dropped_when_released(
    servers: tuple[RedisProcess, RedisProcess],
    pool_and_sentinels: tuple[BlockingSentinelConnectionPool, StubSentinels],
) -> None:
    before, after = servers
    pool, sentinels = pool_and_sentinels
    idle, in_use = await pool.get_connection(), await pool.get_connection()
    await pool.release(idle)
    sentinels.name(after)
    await pool.get_master_address()  # as the hub's watcher asks, every redis_timeout_s
    assert not idle.is_connected, "idle connections to the former primary are dropped"
    assert in_use.is_connected
    assert in_use.port == before.port
    await pool.release(in_use)
    assert not in_use.is_connected
    connections = [await pool.get_connection() for _ in range(2)]
    assert {c.port for c in connections} == {after.port}
    for connection in connections:
        await pool.release(connection)


async def test_the_pool_waits_for_a_free_connection_instead_of_failing(
    pool_and_sentinels: tuple[BlockingSentinelConnectionPool, StubSentinels],
) -> None:
    pool, _ = pool_and_sentinels
    held = [await pool.get_connection() for _ in range(2)]
    waiting = asyncio.create_task(pool.get_connection())
    done, _ = await asyncio.wait([waiting], timeout=0.2)
    assert not done, "the third caller is queued, not refused"
    await pool.release(held.pop())
    connection = await asyncio.wait_for(waiting, 2)
    for c in [connection, *held]:
        await pool.release(c)
