"""Shared fixtures: settings, a real redis-server, a shared in-memory Redis, app clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster

from service.app import create_app
from service.keys import Keys
from service.redis.connections import RedisClient, RedisOpener, open_redis
from service.settings import Settings, build_settings

from chaos_report import report_table
from redis_process import RedisClusterProcesses, RedisProcess, require_redis_server

# Fast, test-friendly defaults; each test overrides what it is about.
FAST_SETTINGS: dict[str, Any] = {
    "producer_interval_ms": 20,
    "producer_poll_ms": 100,
    "producer_lease_ms": 1000,
    "session_ttl_s": 30.0,
    "retry_ms": 500,
}

MakeSettings = Callable[..., Settings]
StartClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_settings() -> MakeSettings:
    """Build Settings from the fast defaults plus keyword overrides."""

    def make(**overrides: Any) -> Settings:
        return build_settings({**FAST_SETTINGS, **overrides})

    return make


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One real redis-server for the whole run, on a free loopback port."""
    server = RedisProcess(require_redis_server(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server: RedisProcess) -> str:
    """The real server's URL, on a database flushed for this test."""
    client = redis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.Redis]:
    """A plain client on the real server, for assertions about its state."""
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A three-primary Redis Cluster on loopback ports, for the whole run."""
    cluster = RedisClusterProcesses(require_redis_server(), tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass(frozen=True)
class RedisTarget:
    """A real Redis deployment to run a test against: one server, or a cluster."""

    url: str
    cluster: bool

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that point a worker at it."""
        return {"redis_url": self.url, "redis_cluster": self.cluster}

    def client(self) -> RedisClient:
        """A plain client for assertions about its state."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)


@pytest.fixture(params=["single", "cluster"])
async def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Each integration test twice: on one redis-server and on a Redis Cluster, both flushed."""
    if request.param == "single":
        target = RedisTarget(request.getfixturevalue("redis_server").url, cluster=False)
    else:
        target = RedisTarget(request.getfixturevalue("redis_cluster").url, cluster=True)
    client = target.client()
    if isinstance(client, RedisCluster):
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.flushall()
    await client.aclose()
    return target


@pytest.fixture
async def target_client(redis_target: RedisTarget) -> AsyncIterator[RedisClient]:
    """A client on the `redis_target` deployment."""
    client = redis_target.client()
    yield client
    await client.aclose()


async def pubsub_connections(client: RedisClient) -> int:
    """Pub/sub connections open on the server, or on all cluster primaries together."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        total = 0
        for node in client.get_primaries():
            listed = await client.execute_command(
                "CLIENT", "LIST", "TYPE", "pubsub", target_nodes=node
            )
            total += len([line for line in _lines(listed) if line])
        return total
    return len(await client.client_list(_type="pubsub"))


def _lines(listed: Any) -> list[str]:
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    return text.splitlines()


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float = 5.0,
                   interval_s: float = 0.01) -> None:
    """Poll `condition` until it holds; fail the test if the deadline passes first."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(interval_s)


async def logged_ids(client: RedisClient, session_id: str) -> list[str]:
    """The ids in a session's event log, oldest first."""
    entries = await client.xrange(Keys().log(session_id))
    return [entry_id.decode() for entry_id, _ in entries]


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    """One in-memory Redis that several apps of a test share."""
    return fakeredis.FakeServer()


@pytest.fixture
def fake_opener(fake_server: fakeredis.FakeServer) -> RedisOpener:
    """Opens clients on the shared in-memory Redis."""

    async def open_fake(settings: Settings, /) -> redis.Redis:
        del settings
        client: redis.Redis = fakeredis.FakeAsyncRedis(server=fake_server)
        return client

    return open_fake


@pytest.fixture
def start_client(aiohttp_client: Any) -> StartClient:
    """Start an app built by the production factory and return a client for it."""

    async def start(
        settings: Settings, open_client: RedisOpener = open_redis, **client_kwargs: Any
    ) -> Any:
        return await aiohttp_client(create_app(settings, open_client), **client_kwargs)

    return start


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The chaos suite's table (one row per fault, with its counts), then the failover
    tests' accounts (events expected, received, gap-signalled, ...)."""
    lines = report_table()
    if lines:
        terminalreporter.section("chaos report")
        for line in lines:
            terminalreporter.write_line(line)
    failovers = [
        f"{report.nodeid}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "failover"
    ]
    if failovers:
        terminalreporter.section("failover reports")
        for line in failovers:
            terminalreporter.write_line(line)
