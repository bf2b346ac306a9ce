"""Fan-out over a real Redis: every connection gets every event, whichever worker holds it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from service.keys import Keys
from service.publisher import Publisher

from conftest import MakeSettings, StartClient, wait_for
from sse_reader import collect

pytestmark = pytest.mark.redis


async def numsub(client: redis.Redis, channel: str) -> int:
    reply = await client.pubsub_numsub(channel)
    return int(reply[0][1])


async def test_two_instances_both_get_all_ten_and_the_producer_ran_once(
    start_client: StartClient, make_settings: MakeSettings, redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=redis_url, producer_interval_ms=50)
    first, second = await start_client(settings), await start_client(settings)
    session_id = await (await first.get("/sse/getSessionId")).text()

    async def read(client: Any) -> list[Any]:
        async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
            return await collect(response)

    got_first, got_second = await asyncio.gather(read(first), read(second))
    assert [e.id for e in got_first] == [e.id for e in got_second]
    assert len(got_first) == 10
    assert got_first[-1].event == "finish"
    # Exactly one run: the log holds ten events, not twenty.
    assert await redis_client.xlen(Keys().log(session_id)) == 10


async def test_client_disconnect_releases_the_subscription(
    start_client: StartClient, make_settings: MakeSettings, redis_url: str,
    redis_client: redis.Redis,
) -> None:
    client = await start_client(make_settings(redis_url=redis_url, demo_runs=False))
    channel = Keys().channel("leaving")
    response = await client.get("/sse/connect", params={"sessionId": "leaving"})
    await response.content.readuntil(b"\n\n")
    assert await numsub(redis_client, channel) == 1
    response.close()

    async def released() -> bool:
        return await numsub(redis_client, channel) == 0

    await wait_for(released)


async def test_many_connections_share_one_pubsub_connection(
    start_client: StartClient, make_settings: MakeSettings, redis_url: str,
    redis_client: redis.Redis,
) -> None:
    count = 500
    settings = make_settings(redis_url=redis_url, demo_runs=False)
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    session_ids = [f"many-{i}" for i in range(count)]
    responses = await asyncio.gather(*(
        client.get("/sse/connect", params={"sessionId": sid}) for sid in session_ids
    ))
    try:
        for response in responses:
            await response.content.readuntil(b"\n\n")
        pubsub_clients = await redis_client.client_list(_type="pubsub")
        assert len(pubsub_clients) == 1
        all_clients = await redis_client.client_list()
        assert len(all_clients) <= 4  # pub/sub + pooled command connections + this one

        publisher = Publisher(redis_client, Keys(), session_ttl_s=30, log_maxlen=100)
        for sid in session_ids:
            await publisher.publish(sid, "finish", f"bye {sid}")
        received = await asyncio.gather(*(collect(r) for r in responses))
        assert [[e.data for e in events] for events in received] == [
            [f"bye {sid}"] for sid in session_ids
        ]
    finally:
        for response in responses:
            response.close()
