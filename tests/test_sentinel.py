"""Redis Sentinel under live streams: the worker follows the primary the Sentinels name.

One primary, one replica and three Sentinels (a primary silent for one second is failed
over). A forced failover (`SENTINEL FAILOVER`) and a crash (SIGKILL) each happen while
streams are open and events are published through the worker: its commands and its shared
subscription must reach the new primary, every stream must get every event or be told of
the ones the crash lost (`event: gap`), and nothing may arrive twice or not at all.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from service.keys import Keys
from service.publisher import Publisher
from service.resources import hub_key

from app_clients import MakeSettings, StartClient
from delivery_audit import (
    READY_AGAIN_S,
    DeliveryAudit,
    ReadinessLog,
    is_ready,
    wait_until_async,
)
from redis_process import (
    RedisProcess,
    RedisSentinelProcesses,
    require_redis_sentinel,
    require_redis_server,
)
from redis_state import logged_ids
from sse_reader import STREAM_OPENED, collect

pytestmark = [pytest.mark.redis, pytest.mark.ha]

TOKEN = "sentinel-test-token-0123456789"
SESSIONS = 20


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[RedisSentinelProcesses]:
    """A primary, its replica and three Sentinels on loopback ports, for one test."""
    group = RedisSentinelProcesses(
        require_redis_server(), require_redis_sentinel(), tmp_path / "sentinel"
    )
    try:
        group.start()
        yield group
    finally:
        group.stop()


async def start_worker(
    start_client: StartClient, make_settings: MakeSettings, group: RedisSentinelProcesses
) -> Any:
    settings = make_settings(
        redis_url=group.url, demo_runs=False, publish_tokens=(TOKEN,),
        heartbeat_interval_s=0.5, redis_timeout_s=1.0, redis_max_connections=8,
    )  # fmt: skip
    return await start_client(settings, connector=aiohttp.TCPConnector(limit=0))


async def sentinel_command(group: RedisSentinelProcesses, *args: str) -> Any:
    async with redis.Redis(host="127.0.0.1", port=group.sentinels[0].port) as client:
        return await client.execute_command(*args)


async def check_told_of_lost_events(
    audit: DeliveryAudit, primary: RedisProcess, session_ids: list[str]
) -> None:
    """Each stream was told of a gap exactly when the primary's log lacks events it got."""
    async with redis.Redis(host="127.0.0.1", port=primary.port) as client:
        for session_id in session_ids:
            kept = set(await logged_ids(client, session_id))
            lost = [i for i in audit.received_ids(session_id) if i not in kept]
            assert audit.logs[session_id].told_of_gap == bool(lost), session_id


async def test_a_forced_failover_moves_commands_and_streams_to_the_new_primary(
    start_client: StartClient,
    make_settings: MakeSettings,
    sentinels: RedisSentinelProcesses,
    record_property: Callable[[str, Any], None],
) -> None:
    old, new = sentinels.primary(), sentinels.replica()
    client = await start_worker(start_client, make_settings, sentinels)
    session_ids = [f"sf-{n}" for n in range(SESSIONS)]
    audit = DeliveryAudit(client, session_ids, TOKEN)
    readiness = ReadinessLog(client)

    async def failover() -> float:
        fault_at = time.monotonic()
        assert await sentinel_command(sentinels, "SENTINEL", "FAILOVER", "mymaster")
        return fault_at

    async def switched() -> None:
        # The former primary still takes writes until the Sentinels demote it: the worker
        # must not wait for that, but move as soon as they name the new one.
        await asyncio.to_thread(sentinels.wait_for_primary, new)
        await wait_until_async(lambda: hub_subscribed_at(new), "the worker follows", 10)

    try:
        await audit.open()
        times = await audit.play(readiness, failover, switched)
    finally:
        await audit.close()
        await readiness.stop()
    report = audit.report("sentinel: SENTINEL FAILOVER", times.fault_at)
    record_property("failover", f"{report.line()}; {times.recovered_line('switched')}")
    report.assert_no_silence()
    # No process died: every event this worker had acknowledged reached every stream, those
    # the former primary took after the switch too (and the streams were told they are gone).
    assert report.missing == 0, report.line()
    await check_told_of_lost_events(audit, new, session_ids)
    hub = client.app[hub_key]
    assert hub.connected
    # Ready again at the canary round after delivery resumed.
    await wait_until_async(lambda: is_ready(client), "ready again", READY_AGAIN_S)
    assert await hub_subscribed_at(new), "the shared subscription is on the new primary"
    assert old.process is not None, "the former primary lives on, as a replica"


async def test_a_killed_primary_is_replaced_and_lost_events_are_told(
    start_client: StartClient,
    make_settings: MakeSettings,
    sentinels: RedisSentinelProcesses,
    record_property: Callable[[str, Any], None],
) -> None:
    old, new = sentinels.primary(), sentinels.replica()
    client = await start_worker(start_client, make_settings, sentinels)
    session_ids = [f"sk-{n}" for n in range(SESSIONS)]
    audit = DeliveryAudit(client, session_ids, TOKEN)
    readiness = ReadinessLog(client)

    async def crash_with_unreplicated_writes() -> float:
        # As in a crash that outruns async replication: the last round is only on `old`.
        assert new.process is not None
        new.process.send_signal(signal.SIGSTOP)
        try:
            async with redis.Redis(host="127.0.0.1", port=old.port) as primary:
                await primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
            rounds = audit.rounds
            await wait_until_async(lambda: audit.rounds > rounds + 1, "an unreplicated round", 5)
            fault_at = time.monotonic()
            old.kill()
        finally:
            new.process.send_signal(signal.SIGCONT)
        return fault_at

    async def promoted() -> None:
        await asyncio.to_thread(sentinels.wait_for_primary, new)

    try:
        await audit.open()
        times = await audit.play(readiness, crash_with_unreplicated_writes, promoted)
    finally:
        await audit.close()
        await readiness.stop()
    report = audit.report("sentinel: SIGKILL of the primary", times.fault_at)
    record_property("failover", f"{report.line()}; {times.recovered_line('promoted')}")
    report.assert_no_silence()
    assert report.gap_signalled > 0, "the unreplicated round was lost: streams must be told"
    await check_told_of_lost_events(audit, new, session_ids)
    assert readiness.unready_between(times.fault_at, times.resumed_at)
    # Ready again at the canary round after delivery resumed.
    await wait_until_async(lambda: is_ready(client), "ready again", READY_AGAIN_S)
    assert client.app[hub_key].connected


async def test_a_subscription_left_on_a_primary_the_sentinels_dropped_moves_to_theirs(
    start_client: StartClient,
    make_settings: MakeSettings,
    sentinels: RedisSentinelProcesses,
) -> None:
    """The former primary keeps its clients and its role (as when it is cut off from the
    Sentinels but not from the worker); publishers that ask the Sentinels write elsewhere.
    Nothing drops the worker's subscription: it must notice by itself."""
    old, new = sentinels.primary(), sentinels.replica()
    client = await start_worker(start_client, make_settings, sentinels)
    response = await client.get("/sse/connect", params={"sessionId": "stranded"})
    await response.content.readuntil(STREAM_OPENED)
    assert await hub_subscribed_at(old)
    async with redis.Redis(host="127.0.0.1", port=new.port) as promoted:
        await promoted.execute_command("REPLICAOF", "NO", "ONE")
        for sentinel in sentinels.sentinels:
            async with redis.Redis(host="127.0.0.1", port=sentinel.port) as watcher:
                await watcher.execute_command("SENTINEL", "REMOVE", "mymaster")
                await watcher.execute_command(
                    "SENTINEL", "MONITOR", "mymaster", "127.0.0.1", str(new.port), "2"
                )
        # What a worker that follows the Sentinels writes: only the new primary has it.
        publisher = Publisher(promoted, Keys(), session_ttl_s=60, log_maxlen=100)
        await publisher.publish("stranded", "", "on the new primary")
        await wait_until_async(lambda: hub_subscribed_at(new), "the subscription moved", 10)
        await publisher.publish("stranded", "finish", "end")
    events = await collect(response, timeout_s=10)
    assert [(e.event, e.data) for e in events] == [
        ("message", "on the new primary"),
        ("finish", "end"),
    ]
    assert not await hub_subscribed_at(old)


async def hub_subscribed_at(server: RedisProcess) -> bool:
    """The worker's shared subscription is on `server` (it always holds the control channel).

    Counted by channel: the Sentinels hold pub/sub connections of their own on every server.
    """
    async with redis.Redis(host="127.0.0.1", port=server.port) as client:
        [(_, count)] = await client.pubsub_numsub(Keys().hub_control)
        return bool(count == 1)
