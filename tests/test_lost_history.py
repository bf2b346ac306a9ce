"""When history is lost: `gap`, then the stream goes on if the session lives, else it ends.

The contract: a stream that finds its history gone gets `event: gap` (data: the last id it
had). If the session still exists (its log was only trimmed) the stream continues; if the
session is gone (expired, deleted, Redis emptied) the stream ends right after the gap, and a
resume of a gone session is answered 204, which stops EventSource for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from service.keys import Keys
from service.publisher import Publisher
from service.resources import hub_key, producer_key

from app_clients import AppClient, MakeSettings, StartClient
from redis_process import RedisProcess, require_redis_server
from sse_reader import STREAM_OPENED, ReceivedEvent, SSEParser, collect
from waiting import wait_for

pytestmark = pytest.mark.redis

TOKEN = "lost-history-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server this test may kill and restart, empty, on the same port."""
    server = RedisProcess(require_redis_server(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def connect(client: AppClient, session_id: str, last_event_id: str | None = None) -> Any:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    return await client.get("/sse/connect", params={"sessionId": session_id}, headers=headers)


async def assert_told_to_stop(client: AppClient, session_id: str, last_event_id: str) -> None:
    """A resume is answered 204 (no-store), and the session is not brought back."""
    response = await connect(client, session_id, last_event_id)
    assert response.status == 204
    assert response.headers["Cache-Control"] == "no-store"
    again = await connect(client, session_id, last_event_id)
    assert again.status == 204


async def test_a_trimmed_log_gives_gap_and_the_stream_goes_on_live(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=redis_url, demo_runs=False, log_maxlen=10)
    client = await start_client(settings)
    publisher = Publisher(redis_client, Keys(), session_ttl_s=30, log_maxlen=10)
    first = await publisher.publish("trimmed", "", "event 0")
    for n in range(1, 300):
        await publisher.publish("trimmed", "", f"event {n}")
    parser = SSEParser()
    response = await connect(client, "trimmed", first.event_id)
    assert response.status == 200
    head = await collect(response, until=2, parser=parser)
    assert (head[0].event, head[0].data) == ("gap", first.event_id)
    await publisher.publish("trimmed", "", "live")
    await publisher.publish("trimmed", "finish", "end")
    rest = await collect(response, parser=parser)
    assert [e.data for e in rest][-2:] == ["live", "end"]


async def test_a_resume_of_an_expired_session_is_told_to_stop(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    client = await start_client(
        make_settings(redis_url=redis_url, session_ttl_s=1.0, producer_event_count=3)
    )
    events = await collect(await connect(client, "expiring"), timeout_s=10)
    middle = events[1].id

    async def expired() -> bool:
        return await redis_client.exists(Keys().session("expiring")) == 0

    await wait_for(expired, timeout_s=5, interval_s=0.05)
    await assert_told_to_stop(client, "expiring", middle)
    assert await redis_client.keys("*{expiring}*") == []


async def test_a_resume_of_a_deleted_session_is_told_to_stop_and_nothing_recreates_it(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False)
    client = await start_client(settings)
    reply = await client.post("/sse/sessions/doomed/events", json={"data": "one"}, headers=AUTH)
    event_id = (await reply.json())["id"]
    assert (await client.delete("/sse/sessions/doomed", headers=AUTH)).status == 204
    await assert_told_to_stop(client, "doomed", event_id)
    late = await client.post("/sse/sessions/doomed/events", json={"data": "two"}, headers=AUTH)
    assert late.status == 404
    assert await redis_client.exists(*Keys().session_keys("doomed")) == 0
    # A repeated DELETE (a caller's retry) is answered as the first was.
    assert (await client.delete("/sse/sessions/doomed", headers=AUTH)).status == 204
    # A fresh connect registers the id again, as the original demo does.
    async with client.get("/sse/connect", params={"sessionId": "doomed"}) as fresh:
        assert fresh.status == 200
    resumed = await connect(client, "doomed", event_id)
    assert resumed.status == 200
    resumed.close()


async def test_a_live_stream_of_a_deleted_session_ends_with_its_finish(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    settings = make_settings(redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False)
    client = await start_client(settings)
    response = await connect(client, "live-delete")
    await response.content.readuntil(STREAM_OPENED)
    assert (await client.delete("/sse/sessions/live-delete", headers=AUTH)).status == 204
    events = await collect(response)
    assert [(e.event, e.data) for e in events] == [("finish", "session deleted")]
    await assert_told_to_stop(client, "live-delete", events[-1].id)


async def test_a_resume_after_redis_was_emptied_is_told_to_stop(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    client = await start_client(make_settings(redis_url=redis_url, producer_event_count=4))
    events = await collect(await connect(client, "flushed"))
    await redis_client.flushall()
    await assert_told_to_stop(client, "flushed", events[1].id)


def real_events(events: list[ReceivedEvent]) -> list[ReceivedEvent]:
    return [e for e in events if e.event != "gap"]


async def test_runs_lost_in_an_empty_restart_end_every_stream_and_new_runs_still_go(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
) -> None:
    settings = make_settings(
        redis_url=own_redis.url,
        producer_interval_ms=150,
        producer_lease_ms=1000,
        heartbeat_interval_s=0.5,
        redis_timeout_s=0.5,
    )
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    streams = [await connect(client, f"run{n}") for n in range(10)]
    parsers = [SSEParser() for _ in streams]
    heads = [await collect(s, until=2, parser=p) for s, p in zip(streams, parsers, strict=True)]

    own_redis.kill()
    own_redis.start()  # empty: the sessions, their logs and their runs are gone

    async with asyncio.timeout(20):  # each stream ends by itself: none waits for its TTL
        tails = await asyncio.gather(
            *(collect(s, parser=p) for s, p in zip(streams, parsers, strict=True))
        )
    for head, tail in zip(heads, tails, strict=True):
        assert tail, "the stream ended without a word"
        assert tail[-1].event == "gap"
        assert [e.event for e in tail].count("gap") == 1
        received = real_events(head + tail)
        assert tail[-1].data == received[-1].id
        assert len(received) < 10
    for n, head in enumerate(heads):
        response = await connect(client, f"run{n}", real_events(head + tails[n])[-1].id)
        assert response.status == 204

    producer = client.app[producer_key]

    async def no_dead_runs() -> bool:
        return producer.active_runs == 0

    await wait_for(no_dead_runs, timeout_s=10, interval_s=0.05)
    assert client.app[hub_key].connected
    fresh = await collect(await connect(client, "after-restart"), timeout_s=15)
    assert [e.event for e in fresh] == ["message"] * 9 + ["finish"]
