"""Redis faults: a crashed and restarted server, a killed subscription, a server that is down."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.keys import Keys
from service.publisher import Publisher
from service.resources import hub_key

from app_clients import AppClient, MakeSettings, StartClient
from redis_process import RedisProcess, require_redis_server
from redis_state import logged_ids
from sse_reader import STREAM_OPENED, ReceivedEvent, collect
from waiting import wait_for

pytestmark = pytest.mark.redis

STREAMS = 20
TOKEN = "fault-test-token-0123456789"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server this test may kill and restart on the same port."""
    server = RedisProcess(require_redis_server(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def publisher_client(own_redis: RedisProcess) -> AsyncIterator[redis.Redis]:
    # Like any client of a Redis that restarts, it retries a command on a fresh connection.
    client = redis.Redis.from_url(
        own_redis.url,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 3),
        retry_on_error=[redis.ConnectionError],
    )
    yield client
    await client.aclose()


async def open_streams(client: AppClient, count: int) -> list[Any]:
    responses = [
        await client.get("/sse/connect", params={"sessionId": f"s{n}"}) for n in range(count)
    ]
    for response in responses:
        assert response.status == 200
        await response.content.readuntil(STREAM_OPENED)
    return responses


async def publish_round(publisher: Publisher, first: int, last: int, finish: bool) -> None:
    for n in range(STREAMS):
        for k in range(first, last):
            final = finish and k == last - 1
            await publisher.publish(f"s{n}", "finish" if final else "", f"e{k}")


def data_of(events: list[ReceivedEvent]) -> list[str]:
    return [e.data for e in events if e.event != "gap"]


async def test_streams_outlive_a_redis_crash_and_end_after_gap_when_it_restarts_empty(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
    publisher_client: redis.Redis,
) -> None:
    settings = make_settings(
        redis_url=own_redis.url,
        demo_runs=False,
        producer="off",
        heartbeat_interval_s=0.5,
        redis_timeout_s=1.0,
    )
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    hub = client.app[hub_key]
    streams = await open_streams(client, STREAMS)
    readers = [asyncio.create_task(collect(r, timeout_s=30)) for r in streams]
    publisher = Publisher(publisher_client, Keys(), session_ttl_s=60, log_maxlen=100)
    await publish_round(publisher, 0, 5, finish=False)

    own_redis.kill()
    await asyncio.sleep(2)  # the outage the scenario prescribes, not a synchronisation
    assert not any(reader.done() for reader in readers), "a stream closed during the outage"
    own_redis.start()

    async def reconnected() -> bool:
        return hub.connected and hub.stats.reconnects >= 1

    await wait_for(reconnected, timeout_s=10, interval_s=0.05)
    # The restarted server came back empty: each stream is told its history is gone and,
    # as its session is gone too, ends at once instead of waiting for events that cannot come.
    results = await asyncio.gather(*readers)
    for n, events in enumerate(results):
        assert data_of(events) == [f"e{k}" for k in range(5)]
        assert [e.event for e in events].count("gap") == 1
        assert (events[-1].event, events[-1].data) == ("gap", events[-2].id)
        resumed = await client.get(
            "/sse/connect", params={"sessionId": f"s{n}"}, headers={"Last-Event-ID": events[-2].id}
        )
        assert resumed.status == 204
    assert (await client.get("/healthz")).status == 200


async def test_a_killed_subscription_loses_nothing(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
    publisher_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=own_redis.url, demo_runs=False, producer="off")
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    hub = client.app[hub_key]
    streams = await open_streams(client, STREAMS)
    readers = [asyncio.create_task(collect(r, timeout_s=30)) for r in streams]
    publisher = Publisher(publisher_client, Keys(), session_ttl_s=60, log_maxlen=1000)
    rounds = 30
    for k in range(rounds):
        if k == 10:
            killed = await publisher_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert int(killed) == 1
        await publish_round(publisher, k, k + 1, finish=k == rounds - 1)
    results = await asyncio.gather(*readers)
    for events in results:
        assert [e.event for e in events].count("gap") == 0
        assert data_of(events) == [f"e{k}" for k in range(rounds)]
    assert hub.stats.reconnects >= 1


async def test_requests_fail_fast_with_503_while_redis_is_down(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
) -> None:
    settings = make_settings(redis_url=own_redis.url, publish_tokens=(TOKEN,), redis_timeout_s=1.0)
    client = await start_client(settings)
    assert (await client.get("/readyz")).status == 200
    own_redis.kill()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    requests = {
        "readyz": lambda: client.get("/readyz"),
        "getSessionId": lambda: client.get("/sse/getSessionId"),
        "connect": lambda: client.get("/sse/connect", params={"sessionId": "x"}),
        "publish": lambda: client.post("/sse/sessions/x/events", json={"data": "d"}, headers=auth),
    }
    for name, send in requests.items():
        started = time.monotonic()
        response = await send()
        elapsed_s = time.monotonic() - started
        assert response.status == 503, name
        assert elapsed_s < 1.0, f"{name} took {elapsed_s:.2f}s"
        if name != "readyz":
            assert response.headers["Retry-After"], name
            assert (await response.json())["error"] == "unavailable", name


async def test_the_demo_producer_pauses_through_a_frozen_redis_and_continues(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
    publisher_client: redis.Redis,
) -> None:
    settings = make_settings(
        redis_url=own_redis.url,
        producer_interval_ms=100,
        producer_lease_ms=5000,
        redis_timeout_s=0.5,
        heartbeat_interval_s=0.5,
    )
    client = await start_client(settings)
    response = await client.get("/sse/connect", params={"sessionId": "frozen"})
    head = await collect(response, until=3)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # unresponsive, but keeps its data
    try:
        await asyncio.sleep(1.5)  # the outage the scenario prescribes
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    tail = await collect(response, timeout_s=20)
    received = head + tail
    assert [e.event for e in received] == ["message"] * 9 + ["finish"]
    assert [e.id for e in received] == await logged_ids(publisher_client, "frozen")
