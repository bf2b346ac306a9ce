"""Fan-out over a real Redis: every connection gets every event, whichever worker holds it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from service.keys import Keys
from service.publisher import Publisher
from service.redis.connections import RedisClient
from service.redis.topology import subscriber_count
from service.resources import hub_key

from app_clients import AppClient, MakeSettings, StartClient
from redis_state import RedisTarget, pubsub_connections
from sse_reader import STREAM_OPENED, collect
from waiting import wait_for

pytestmark = pytest.mark.redis


async def test_two_instances_both_get_all_ten_and_the_producer_ran_once(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    settings = make_settings(**redis_target.settings, producer_interval_ms=50)
    first, second = await start_client(settings), await start_client(settings)
    session_id = await (await first.get("/sse/getSessionId")).text()

    async def read(client: AppClient) -> list[Any]:
        async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
            return await collect(response)

    got_first, got_second = await asyncio.gather(read(first), read(second))
    assert [e.id for e in got_first] == [e.id for e in got_second]
    assert len(got_first) == 10
    assert got_first[-1].event == "finish"
    # Exactly one run: the log holds ten events, not twenty.
    assert await target_client.xlen(Keys().log(session_id)) == 10


async def test_client_disconnect_releases_the_subscription(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    client = await start_client(make_settings(**redis_target.settings, demo_runs=False))
    channel = Keys().channel("leaving")
    response = await client.get("/sse/connect", params={"sessionId": "leaving"})
    await response.content.readuntil(STREAM_OPENED)
    assert await subscriber_count(target_client, channel) == 1
    response.close()

    async def released() -> bool:
        return await subscriber_count(target_client, channel) == 0

    await wait_for(released)


async def test_many_connections_share_one_pubsub_connection(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    count = 500
    settings = make_settings(**redis_target.settings, demo_runs=False)
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    session_ids = [f"many-{i}" for i in range(count)]
    responses = await asyncio.gather(
        *(client.get("/sse/connect", params={"sessionId": sid}) for sid in session_ids)
    )
    try:
        for response in responses:
            await response.content.readuntil(STREAM_OPENED)
        hub = client.app[hub_key]
        if redis_target.cluster:
            # Sessions spread over every shard, and one worker reads them all: one
            # connection per shard, not per client.
            assert hub.link_count == 3
            assert await pubsub_connections(target_client) == 3
        else:
            assert hub.link_count == 1
            assert await pubsub_connections(target_client) == 1
            all_clients = await target_client.client_list()
            assert len(all_clients) <= 4  # pub/sub + pooled command connections + this one

        publisher = Publisher(target_client, Keys(), session_ttl_s=30, log_maxlen=100)
        for sid in session_ids:
            await publisher.publish(sid, "finish", f"bye {sid}")
        received = await asyncio.gather(*(collect(r) for r in responses))
        assert [[e.data for e in events] for events in received] == [
            [f"bye {sid}"] for sid in session_ids
        ]
    finally:
        for response in responses:
            response.close()
