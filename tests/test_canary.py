"""Readiness that proves delivery: canaries through every pub/sub connection of the worker.

Each fault here leaves the worker's pub/sub connection open and answering, so the hub still
says it is connected; only an event that does not come back shows that nothing is delivered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.cluster import RedisCluster

from service import resources as r
from service.canary import Canary
from service.hub import Hub
from service.redis.connections import RedisClient, RedisOpener

from app_clients import MakeSettings, StartClient
from redis_state import RedisTarget
from sse_reader import STREAM_OPENED
from waiting import wait_for

# No demo producer: its wake-up channel would be one more to count.
FAST_CANARY = {
    "canary_interval_s": 0.1,
    "canary_timeout_s": 0.5,
    "demo_runs": False,
    "producer": "off",
}


async def readiness(client: Any) -> tuple[int, str]:
    response = await client.get("/readyz")
    return response.status, await response.text()


async def until_ready(client: Any, ready: bool, timeout_s: float = 10.0) -> str:
    """Wait until /readyz says `ready` (200) or not (503); its body then."""
    body = ""

    async def settled() -> bool:
        nonlocal body
        status, body = await readiness(client)
        return (status == 200) is ready

    await wait_for(settled, timeout_s=timeout_s, interval_s=0.05)
    return body


async def scrape(client: Any) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_worker_is_ready_once_a_canary_came_back_and_reports_its_round_trip(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(**FAST_CANARY), fake_opener)
    canary: Canary = client.app[r.canary_key]
    # The first round runs before the worker serves: ready from the first probe on.
    assert canary.latest is not None
    assert canary.latest.ok
    assert (await readiness(client))[0] == 200
    metrics = await scrape(client)
    assert metrics["sse_canary_ok"] == 1
    assert metrics["sse_canary_links"] == 1
    assert 0 < metrics["sse_canary_round_trip_seconds"] < 0.5
    assert metrics["sse_canary_failures_total"] == 0
    # The canary's channel is the worker's own: no client channel, no listener.
    assert metrics["sse_hub_channels"] == 0
    assert (await (await client.get("/readyz")).json())["listeners"] == 0


async def test_readyz_reads_the_latest_round_and_never_publishes_itself(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    settings = make_settings(**{**FAST_CANARY, "canary_interval_s": 60.0})
    client = await start_client(settings, fake_opener)
    canary: Canary = client.app[r.canary_key]
    rounds = canary.rounds
    for _ in range(50):
        assert (await readiness(client))[0] == 200
    assert canary.rounds == rounds  # a probe storm costs Redis nothing


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_readiness_goes_stale_when_the_rounds_stop(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(**FAST_CANARY), fake_opener)
    canary: Canary = client.app[r.canary_key]
    assert (await readiness(client))[0] == 200
    await canary.close()  # as if its task had died
    body = await until_ready(client, ready=False, timeout_s=5)
    assert "no round completed recently" in body


async def open_streams(client: Any, count: int) -> list[Any]:
    responses = []
    for n in range(count):
        response = await client.get("/sse/connect", params={"sessionId": f"canary-{n}"})
        async with asyncio.timeout(5):
            await response.content.readuntil(STREAM_OPENED)
        responses.append(response)
    return responses


async def start_on(
    target: RedisTarget, start_client: StartClient, make_settings: MakeSettings
) -> tuple[Any, Hub, Canary, list[Any]]:
    """A worker on `target`; on a cluster, with streams on every shard (a link each)."""
    client = await start_client(make_settings(**target.settings, **FAST_CANARY))
    app = client.app
    hub, canary = app[r.hub_key], app[r.canary_key]
    streams = await open_streams(client, 30) if target.cluster else []
    links = 3 if target.cluster else 1

    async def every_link_checked() -> bool:
        return (
            hub.link_count == links
            and canary.latest is not None
            and (canary.latest.links == links and canary.latest.ok)
        )

    await wait_for(every_link_checked, timeout_s=10)
    assert hub.channel_count == len(streams)  # one canary a link, none of them counted
    return client, hub, canary, streams


def assert_names_no_server(body: str, target: RedisTarget) -> None:
    assert "127.0.0.1" not in body
    assert "localhost" not in body
    port = target.url.rsplit(":", 1)[1].split("/")[0]
    assert port not in body


@pytest.mark.redis
async def test_readiness_fails_while_redis_pauses_and_returns_after(
    redis_target: RedisTarget,
    target_client: RedisClient,
    start_client: StartClient,
    make_settings: MakeSettings,
) -> None:
    client, hub, canary, streams = await start_on(redis_target, start_client, make_settings)
    failures = canary.failures
    # Publishers wait, the subscriber's connection stays open and answers PING: the hub sees
    # nothing wrong, and no event reaches a stream.
    if isinstance(target_client, RedisCluster):
        await target_client.execute_command(
            "CLIENT", "PAUSE", "2000", "WRITE", target_nodes=RedisCluster.PRIMARIES
        )
    else:
        await target_client.client_pause(2000, all=False)
    body = await until_ready(client, ready=False, timeout_s=5)
    assert "delivery check" in body
    assert hub.connected  # what readiness looked at before: still green
    assert_names_no_server(body, redis_target)
    assert canary.failures > failures
    assert (await scrape(client))["sse_canary_ok"] == 0
    # The pause lapses: the canaries, and readiness, come back on their own.
    await until_ready(client, ready=True, timeout_s=10)
    for response in streams:
        response.close()


@pytest.mark.redis
async def test_readiness_fails_when_a_subscription_is_dropped_behind_the_hubs_back(
    redis_target: RedisTarget,
    start_client: StartClient,
    make_settings: MakeSettings,
) -> None:
    client, hub, _, streams = await start_on(redis_target, start_client, make_settings)
    link = next(iter(hub._links.values()))
    (channel,) = [c for c in hub.channels_of(link) if c.startswith(b"sse:canary:")]
    # The connection stays open and subscribed to its other channels; the hub still holds
    # this one as live. Only its events stop.
    link.unsubscribe(channel)
    body = await until_ready(client, ready=False, timeout_s=5)
    links = 3 if redis_target.cluster else 1
    assert f"1 of {links} pub/sub connections did not deliver" in body
    assert hub.connected
    assert_names_no_server(body, redis_target)
    # A reconnect subscribes every channel in use again: delivery, and readiness, are back.
    await link.reconnect("test: subscriptions lost")
    await until_ready(client, ready=True, timeout_s=10)
    for response in streams:
        response.close()
