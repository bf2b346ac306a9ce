"""Shared fixtures: settings, a real redis-server, a shared in-memory Redis, app clients.

Fixtures only: the helpers and types tests import live in app_clients, redis_state and
waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as redis
from pytest_aiohttp import AiohttpClient
from redis.asyncio.cluster import RedisCluster

from service.app import create_app
from service.redis.connections import RedisClient, RedisOpener, open_redis
from service.settings import Settings, build_settings

from app_clients import FAST_SETTINGS, AppClient, MakeSettings, StartClient
from chaos_report import report_table
from redis_process import RedisClusterProcesses, RedisProcess, require_redis_server
from redis_state import RedisTarget


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
def start_client(aiohttp_client: AiohttpClient) -> StartClient:
    """Start an app built by the production factory and return a client for it."""

    async def start(
        settings: Settings, open_client: RedisOpener = open_redis, /, **client_kwargs: Any
    ) -> AppClient:
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
