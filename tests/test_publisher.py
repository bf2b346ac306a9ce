"""The publisher against a real Redis: concurrent publishes share round trips, never replies."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.keys import Keys
from service.publisher import Fence, Publisher, PublishOutcome

from redis_state import logged_data


def _publisher(client: redis.Redis) -> Publisher:
    return Publisher(client, Keys(), session_ttl_s=30, log_maxlen=1000)


async def test_concurrent_publishes_share_batches_and_each_gets_its_own_id(
    redis_client: redis.Redis,
) -> None:
    publisher = _publisher(redis_client)
    sessions = [f"batch{n}" for n in range(20)]

    async def publish_all(session_id: str) -> list[str]:
        ids = []
        for seq in range(10):
            published = await publisher.publish(session_id, "", f"{session_id}:{seq}")
            assert published.outcome is PublishOutcome.PUBLISHED
            ids.append(published.event_id)
        return ids

    returned = await asyncio.gather(*(publish_all(s) for s in sessions))

    assert publisher.events_published == 200
    # Twenty publishers in step: far fewer round trips than publishes.
    assert publisher.batches_sent <= 40
    for session_id, ids in zip(sessions, returned, strict=True):
        logged = await logged_data(redis_client, session_id)
        assert [entry_id for entry_id, _ in logged] == ids
        assert [data for _, data in logged] == [f"{session_id}:{seq}" for seq in range(10)]


async def test_a_script_missing_from_the_server_is_loaded_and_the_batch_resent(
    redis_client: redis.Redis,
) -> None:
    publisher = _publisher(redis_client)
    await publisher.publish("flushed", "", "before")
    await redis_client.script_flush()

    results = await asyncio.gather(
        *(publisher.publish("flushed", "", f"after {n}") for n in range(5))
    )

    assert all(r.outcome is PublishOutcome.PUBLISHED for r in results)
    logged = await logged_data(redis_client, "flushed")
    assert [data for _, data in logged] == ["before", *(f"after {n}" for n in range(5))]


async def test_one_refused_call_fails_alone_and_its_batch_neighbours_go_out(
    redis_client: redis.Redis,
) -> None:
    publisher = _publisher(redis_client)
    keys = Keys()
    # The session's log key holds a string, so XADD fails inside the script for it only.
    await redis_client.set(keys.log("broken"), "not a stream")

    results = await asyncio.gather(
        publisher.publish("fine", "", "one"),
        publisher.publish("broken", "", "two"),
        publisher.publish("fine", "", "three"),
        return_exceptions=True,
    )

    assert isinstance(results[1], redis.ResponseError)
    assert [data for _, data in await logged_data(redis_client, "fine")] == ["one", "three"]


async def test_a_fenced_retry_after_a_lost_reply_is_reported_done_not_sent_twice(
    redis_client: redis.Redis,
) -> None:
    keys = Keys()
    publisher = _publisher(redis_client)
    await redis_client.hset(keys.run("fenced"), mapping={"state": "active", "next": 0, "count": 3})
    await redis_client.set(keys.lease("fenced"), "token")
    fence = Fence(token="token", seq=0, lease_ms=5000)

    first, retry = await asyncio.gather(
        publisher.publish("fenced", "", "step 0", fence),
        publisher.publish("fenced", "", "step 0", fence),
    )

    assert first.outcome is PublishOutcome.PUBLISHED
    assert retry.outcome is PublishOutcome.ALREADY_PUBLISHED
    assert len(await logged_data(redis_client, "fenced")) == 1


async def test_publishes_fail_with_the_connection_error_when_redis_is_gone() -> None:
    client = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    publisher = _publisher(client)
    try:
        results = await asyncio.gather(
            *(publisher.publish(f"s{n}", "", "x") for n in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, redis.ConnectionError) for r in results)
        # The queue is not stuck: a later publish fails promptly too, rather than hanging.
        async with asyncio.timeout(5):
            again = await asyncio.gather(publisher.publish("s", "", "y"), return_exceptions=True)
        assert isinstance(again[0], redis.ConnectionError)
    finally:
        await client.aclose()
