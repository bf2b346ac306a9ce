"""The connect path's Redis work: a stream's first page of the log comes with its attach."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.asyncio.client import MonitorCommandInfo

from service.keys import Keys
from service.publisher import Publisher
from service.stream import REPLAY_FIRST_PAGE

from app_clients import AppClient, MakeSettings, StartClient
from sse_reader import collect

pytestmark = pytest.mark.redis


@contextlib.asynccontextmanager
async def monitored(redis_url: str) -> AsyncIterator[list[MonitorCommandInfo]]:
    """The commands the server ran inside the block (those its scripts ran included)."""
    commands: list[MonitorCommandInfo] = []
    client = redis.Redis.from_url(redis_url)
    marker = f"monitored-{secrets.token_hex(8)}"
    try:
        async with client.monitor() as monitor:
            yield commands
            await client.echo(marker)
            while marker not in (command := await monitor.next_command())["command"]:
                commands.append(command)
    finally:
        await client.aclose()


def log_reads(commands: list[MonitorCommandInfo], session_id: str) -> list[str]:
    """The reads of a session's log, each as `<client type> <command>`."""
    log_key = Keys().log(session_id)
    return [
        f"{command['client_type']} {command['command']}"
        for command in commands
        if command["command"].split(" ")[:2] in (["XRANGE", log_key], ["XREVRANGE", log_key])
    ]


async def logged(redis_client: redis.Redis, session_id: str, count: int) -> list[str]:
    publisher = Publisher(redis_client, Keys(), session_ttl_s=300, log_maxlen=1000)
    return [(await publisher.publish(session_id, "", f"m{n}")).event_id for n in range(count)]


async def read(client: AppClient, session_id: str, count: int, **headers: str) -> list[str]:
    response = await client.get("/sse/connect", params={"sessionId": session_id}, headers=headers)
    assert response.status == 200
    events = await collect(response, until=count)
    response.close()
    return [event.id for event in events]


async def test_a_connect_reads_no_log_page_of_its_own(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    client = await start_client(make_settings(redis_url=redis_url, demo_runs=False))
    ids = await logged(redis_client, "short", 3)
    async with monitored(redis_url) as commands:
        assert await read(client, "short", 3) == ids
        assert await read(client, "short", 2, **{"Last-Event-ID": ids[0]}) == ids[1:]
    log_key = Keys().log("short")
    assert log_reads(commands, "short") == [
        f"lua XRANGE {log_key} 0-0 + COUNT {REPLAY_FIRST_PAGE}",
        f"lua XRANGE {log_key} {ids[0]} + COUNT {REPLAY_FIRST_PAGE}",
    ]


async def test_a_log_longer_than_the_first_page_is_read_on_from_its_end(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    client = await start_client(make_settings(redis_url=redis_url, demo_runs=False))
    ids = await logged(redis_client, "long", 3 * REPLAY_FIRST_PAGE)
    async with monitored(redis_url) as commands:
        assert await read(client, "long", len(ids)) == ids
    reads = log_reads(commands, "long")
    assert reads[0].startswith("lua XRANGE")
    assert [read.split(" ")[:4] for read in reads[1:]] == [
        ["tcp", "XRANGE", Keys().log("long"), "(" + ids[REPLAY_FIRST_PAGE - 1]]
    ]
