"""Many clients resuming a long log at once, on a worker with a small Redis pool.

Every resume must get its whole history: replays queue for Redis among themselves and never
take the connections that attaches need, so none is refused while Redis is healthy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from service.keys import Keys
from service.publisher import Publisher

from app_clients import MakeSettings, StartClient
from redis_state import logged_ids
from sse_reader import SSEParser, collect

pytestmark = pytest.mark.redis

RESUMES = 100
LOG_EVENTS = 1000
EVENT_BYTES = 2048


async def test_a_hundred_resumes_of_a_long_log_at_once_all_get_every_event(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    # The default pool: three connections, one of them the shared subscription's.
    settings = make_settings(
        redis_url=redis_url, demo_runs=False, redis_max_connections=3, redis_timeout_s=0.5
    )
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    publisher = Publisher(redis_client, Keys(), session_ttl_s=300, log_maxlen=10_000)
    for n in range(LOG_EVENTS - 1):
        await publisher.publish("storm", "", f"{n:06d}" + "x" * (EVENT_BYTES - 6))
    await publisher.publish("storm", "finish", "end")
    logged = await logged_ids(redis_client, "storm")
    assert len(logged) == LOG_EVENTS

    async def resume() -> tuple[list[int], list[str]]:
        """Follow the stream as EventSource would: reconnect after `retry:` until `finish`."""
        statuses: list[int] = []
        ids: list[str] = []
        for _ in range(20):
            response = await client.get(
                "/sse/connect",
                params={"sessionId": "storm"},
                headers={
                    "Last-Event-ID": ids[-1] if ids else logged[0],
                    "Accept": "text/event-stream",
                },
            )
            statuses.append(response.status)
            if response.status != 200:
                break
            parser = SSEParser()
            events: Any = await collect(response, timeout_s=60, parser=parser)
            ids.extend(e.id for e in events)
            if events and events[-1].event == "finish":
                break
            await asyncio.sleep((parser.retry_ms or 0) / 1000)
        return statuses, ids

    async with asyncio.timeout(90):
        results = await asyncio.gather(*(resume() for _ in range(RESUMES)))
    for statuses, ids in results:
        assert set(statuses) == {200}
        assert ids == logged[1:]
