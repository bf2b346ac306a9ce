"""No-loss delivery over a real Redis: Last-Event-ID resume, the replay seam, finish, expiry."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from service.envelope import parse_event_id
from service.keys import Keys
from service.publisher import Publisher
from service.redis.connections import RedisClient

from app_clients import AppClient, MakeSettings, StartClient
from redis_state import RedisTarget, logged_ids
from sse_reader import ReceivedEvent, collect
from waiting import wait_for

pytestmark = pytest.mark.redis


async def connect(client: AppClient, session_id: str, last_event_id: str | None = None) -> Any:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    return await client.get("/sse/connect", params={"sessionId": session_id}, headers=headers)


async def test_resume_on_another_instance_gets_the_rest_exactly_once(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    settings = make_settings(**redis_target.settings, producer_interval_ms=100)
    first, second = await start_client(settings), await start_client(settings)
    session_id = await (await first.get("/sse/getSessionId")).text()
    response = await connect(first, session_id)
    head = await collect(response, until=4)
    response.close()
    response = await connect(second, session_id, head[-1].id)
    tail = await collect(response)
    logged = await logged_ids(target_client, session_id)
    assert [e.id for e in head + tail] == logged
    assert len(logged) == 10
    assert tail[-1].event == "finish"


async def test_query_parameter_resumes_like_the_header(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
) -> None:
    client = await start_client(make_settings(**redis_target.settings))
    response = await connect(client, "by-query")
    events = await collect(response)
    resumed = await client.get(
        "/sse/connect", params={"sessionId": "by-query", "lastEventId": events[6].id}
    )
    assert resumed.status == 200
    assert [e.id for e in await collect(resumed)] == [e.id for e in events[7:]]


async def test_seam_between_replay_and_live_has_no_gap_and_no_duplicate(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    count = 150
    settings = make_settings(
        **redis_target.settings, producer_interval_ms=3, producer_event_count=count
    )
    clients = [await start_client(settings) for _ in range(2)]
    rng = random.Random(7)
    received: list[ReceivedEvent] = []
    last_id: str | None = None
    async with asyncio.timeout(30):
        while not received or received[-1].event != "finish":
            client = clients[len(received) % 2]
            response = await connect(client, "seam", last_id)
            assert response.status == 200
            batch = await collect(response, until=rng.randint(1, 6))
            response.close()
            received.extend(batch)
            last_id = received[-1].id if received else None
    logged = await logged_ids(target_client, "seam")
    assert len(logged) == count
    assert [e.id for e in received] == logged


async def test_reconnect_after_finish_gets_204(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
) -> None:
    client = await start_client(make_settings(**redis_target.settings))
    events = await collect(await connect(client, "done"))
    assert events[-1].event == "finish"
    response = await connect(client, "done", events[-1].id)
    assert response.status == 204
    # Resuming from before the finish still replays what was missed, ending with finish.
    replayed = await collect(await connect(client, "done", events[7].id))
    assert [e.id for e in replayed] == [e.id for e in events[8:]]


async def test_fresh_connect_to_a_finished_session_starts_a_new_run(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
) -> None:
    client = await start_client(make_settings(**redis_target.settings))
    first_run = await collect(await connect(client, "again"))
    second_run = await collect(await connect(client, "again"))
    assert len(first_run) == len(second_run) == 10
    assert parse_event_id(second_run[0].id) > parse_event_id(first_run[-1].id)


async def test_second_viewer_joining_mid_run_gets_the_run_so_far(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
) -> None:
    settings = make_settings(**redis_target.settings, producer_interval_ms=50)
    first, second = await start_client(settings), await start_client(settings)
    early = await connect(first, "joined")
    head = await collect(early, until=3)
    late = await collect(await connect(second, "joined"))
    rest = await collect(early)
    assert [e.id for e in late] == [e.id for e in head + rest]


async def test_trimmed_history_is_announced_with_a_gap_event(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    settings = make_settings(**redis_target.settings, demo_runs=False, log_maxlen=10)
    client = await start_client(settings)
    publisher = Publisher(target_client, Keys(), session_ttl_s=30, log_maxlen=10)
    first = await publisher.publish("trimmed", "", "event 0")
    for n in range(1, 400):
        await publisher.publish("trimmed", "", f"event {n}")
    await publisher.publish("trimmed", "finish", "end")
    kept = await target_client.xlen(Keys().log("trimmed"))
    assert kept < 400
    events = await collect(await connect(client, "trimmed", first.event_id))
    assert events[0].event == "gap"
    assert [e.data for e in events[1:]] == [f"event {n}" for n in range(400 - kept + 1, 400)] + [
        "end"
    ]


async def test_expired_session_leaves_no_keys_behind(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    client = await start_client(make_settings(**redis_target.settings, session_ttl_s=1.0))
    events = await collect(await connect(client, "ephemeral"))
    assert events[-1].event == "finish"

    async def nothing_left() -> bool:
        keys = await target_client.keys("*")
        members = await target_client.zcard(Keys().runs)
        return keys == [] and members == 0

    await wait_for(nothing_left, timeout_s=5, interval_s=0.1)
