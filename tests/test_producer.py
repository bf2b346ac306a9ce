"""The demo producer: its events, once per session, and takeover when its process dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from service.keys import Keys
from service.mailbox import StreamEnd
from service.producer import demo_event
from service.redis.connections import RedisClient, RedisOpener
from service.resources import hub_key, producer_key

from app_clients import AppClient, MakeSettings, StartClient
from redis_state import RedisTarget, logged_ids
from sse_reader import STREAM_OPENED, collect
from waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_demo_events_are_worded_like_the_original() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901)
    assert demo_event("abc", 0, 10, moment) == ("", "server time: 03:04:05.678901 id: abc")
    assert demo_event("abc", 8, 10, moment) == ("", "server time: 03:04:05.678901 id: abc")
    assert demo_event("abc", 9, 10, moment) == ("finish", "server time: 03:04:05.678901 结束: abc")


@pytest.mark.redis
async def test_concurrent_first_connections_on_three_instances_start_one_run(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    settings = make_settings(**redis_target.settings, producer_interval_ms=30)
    clients = [await start_client(settings) for _ in range(3)]

    async def read(client: AppClient) -> list[str]:
        response = await client.get("/sse/connect", params={"sessionId": "race"})
        return [e.id for e in await collect(response)]

    results = await asyncio.gather(*(read(c) for c in clients for _ in range(3)))
    assert all(result == results[0] for result in results)
    assert len(results[0]) == 10
    assert await target_client.xlen(Keys().log("race")) == 10


@pytest.mark.redis
async def test_a_burst_of_new_sessions_is_claimed_at_once_and_every_run_completes(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    # Sixty clients from one address: more runs at once than its run limit allows.
    settings = make_settings(**redis_target.settings, producer_interval_ms=10, run_rate_per_s=0)
    client = await start_client(settings)
    sessions = [f"burst{n}" for n in range(60)]

    async def read(session_id: str) -> list[str]:
        response = await client.get("/sse/connect", params={"sessionId": session_id})
        return [e.event or "message" for e in await collect(response)]

    async with asyncio.timeout(20):
        results = await asyncio.gather(*(read(s) for s in sessions))

    assert all(result == ["message"] * 9 + ["finish"] for result in results)
    for session_id in sessions:
        assert await target_client.xlen(Keys().log(session_id)) == 10
    # Finished runs leave the index (a round trip after their `finish` went out); none is
    # left waiting for a producer.

    async def unlisted() -> bool:
        return await target_client.zcard(Keys().runs) == 0

    await wait_for(unlisted)


class ProducerProcess:
    """`python -m service producer` as a child process, as the compose stack runs it."""

    def __init__(self, target: RedisTarget) -> None:
        # Only the settings of this test: the CI's own SSE_* variables are not settings.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
        env = {
            **inherited,
            "SSE_REDIS_URL": target.url,
            "SSE_REDIS_CLUSTER": str(target.cluster).lower(),
            "SSE_PRODUCER_INTERVAL_MS": "150",
            "SSE_PRODUCER_LEASE_MS": "800",
            "SSE_PRODUCER_POLL_MS": "100",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "producer"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )

    async def wait_running(self) -> None:
        assert self.process.stderr is not None
        stderr = self.process.stderr
        async with asyncio.timeout(10):
            while "producer running" not in await asyncio.to_thread(stderr.readline):
                assert self.process.poll() is None, "producer process exited"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.mark.redis
async def test_a_killed_producer_process_is_taken_over_without_loss_or_repeat(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    worker = await start_client(make_settings(**redis_target.settings, producer="off"))
    doomed = ProducerProcess(redis_target)
    try:
        await doomed.wait_running()
        response = await worker.get("/sse/connect", params={"sessionId": "orphan"})
        head = await collect(response, until=4)
    finally:
        doomed.kill()
    assert doomed.process.returncode == -signal.SIGKILL
    # A new worker with an in-process producer finds the orphaned run once its lease lapses.
    await start_client(make_settings(**redis_target.settings, producer_lease_ms=800))
    tail = await collect(response, timeout_s=20)
    received = head + tail
    logged = await logged_ids(target_client, "orphan")
    assert [e.id for e in received] == logged
    assert [e.event for e in received] == ["message"] * 9 + ["finish"]


@pytest.mark.redis
async def test_a_burst_of_fresh_connects_leaves_the_producer_running(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    # Each fresh connect wakes the producer; hundreds arrive faster than it scans. A small
    # inbox makes the burst overflow it for certain, as the default one does under load.
    # The crowd comes from one address here; its run limit would refuse most of it.
    settings = make_settings(
        redis_url=redis_url, producer_interval_ms=5, listener_queue_size=16, run_rate_per_s=0
    )
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))

    async def connect_and_leave(n: int) -> int:
        async with client.get("/sse/connect", params={"sessionId": f"crowd{n}"}) as response:
            await response.content.readuntil(STREAM_OPENED)
            return int(response.status)

    async with asyncio.timeout(30):
        statuses = await asyncio.gather(*(connect_and_leave(n) for n in range(320)))
    assert statuses == [200] * 320

    response = await client.get("/sse/connect", params={"sessionId": "after-the-crowd"})
    events = await collect(response, timeout_s=20)
    assert [e.event for e in events] == ["message"] * 9 + ["finish"]
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()


async def test_readiness_fails_while_the_embedded_producer_is_not_running(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    client = await start_client(make_settings(), fake_opener)
    assert (await client.get("/readyz")).status == 200
    await client.app[producer_key].close()  # its loop is gone, as if it had died
    response = await client.get("/readyz")
    assert response.status == 503
    assert any("producer" in problem for problem in (await response.json())["problems"])


async def test_the_producer_keeps_claiming_after_its_wake_up_listener_was_ended(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    client = await start_client(make_settings(), fake_opener)
    # What a drain or a failed reroute does to every local listener, the producer's included.
    client.app[hub_key].end_listeners(StreamEnd.SHUTDOWN)
    response = await client.get("/sse/connect", params={"sessionId": "afterwards"})
    events = await collect(response, timeout_s=10)
    assert [e.event for e in events] == ["message"] * 9 + ["finish"]
    assert (await client.get("/readyz")).status == 200


@pytest.mark.redis
async def test_a_run_nobody_listens_to_is_parked_and_a_resume_takes_it_on(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    settings = make_settings(
        **redis_target.settings,
        producer_interval_ms=50,
        producer_event_count=60,
        run_idle_timeout_s=0.3,
    )
    client = await start_client(settings)
    response = await client.get("/sse/connect", params={"sessionId": "left"})
    head = await collect(response, until=2)
    response.close()  # the only listener goes away mid-run

    async def parked() -> bool:
        return await target_client.hget(Keys().run("left"), "state") == b"parked"

    await wait_for(parked, timeout_s=10, interval_s=0.05)
    assert client.app[producer_key].active_runs == 0
    assert await target_client.exists(Keys().lease("left")) == 0
    assert await target_client.zscore(Keys().runs, "left") is None
    assert len(await logged_ids(target_client, "left")) < 60

    # The listener comes back: the run goes on where it stopped, nothing lost or repeated.
    resumed = await client.get(
        "/sse/connect", params={"sessionId": "left"}, headers={"Last-Event-ID": head[-1].id}
    )
    tail = await collect(resumed, timeout_s=20)
    received = head + tail
    assert [e.id for e in received] == await logged_ids(target_client, "left")
    assert [e.event for e in received] == ["message"] * 59 + ["finish"]


@pytest.mark.redis
async def test_a_run_whose_lease_lapsed_after_the_runs_index_was_lost_still_finishes(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    # On a cluster the runs index lives on one node and the run on another: that node can
    # restart empty while the run goes on. Here the index goes, then the run's lease lapses
    # under its producer (as when its publishes stall): nobody else will ever add it back.
    settings = make_settings(
        **redis_target.settings, producer_interval_ms=100, producer_lease_ms=2000
    )
    client = await start_client(settings)
    response = await client.get("/sse/connect", params={"sessionId": "adrift"})
    head = await collect(response, until=3)
    await target_client.delete(Keys().runs)
    await target_client.delete(Keys().lease("adrift"))

    tail = await collect(response, timeout_s=10)
    received = head + tail
    assert [e.id for e in received] == await logged_ids(target_client, "adrift")
    assert [e.event for e in received] == ["message"] * 9 + ["finish"]

    # The producer takes the run off the index just after publishing its finish.
    async def forgotten() -> bool:
        return await target_client.zcard(Keys().runs) == 0

    await wait_for(forgotten, timeout_s=5, interval_s=0.05)


@pytest.mark.redis
async def test_a_run_whose_producer_died_after_the_runs_index_was_lost_is_taken_over(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    worker = await start_client(make_settings(**redis_target.settings, producer="off"))
    doomed = ProducerProcess(redis_target)
    try:
        await doomed.wait_running()
        response = await worker.get("/sse/connect", params={"sessionId": "stranded"})
        head = await collect(response, until=3)
        await target_client.delete(Keys().runs)

        async def findable() -> bool:
            return await target_client.zscore(Keys().runs, "stranded") is not None

        # The producer executing the run puts it back where the others look for runs.
        await wait_for(findable, timeout_s=5, interval_s=0.05)
    finally:
        doomed.kill()
    await start_client(make_settings(**redis_target.settings, producer_lease_ms=800))
    tail = await collect(response, timeout_s=20)
    received = head + tail
    assert [e.id for e in received] == await logged_ids(target_client, "stranded")
    assert [e.event for e in received] == ["message"] * 9 + ["finish"]


@pytest.mark.redis
async def test_a_finished_run_removed_late_from_the_index_leaves_the_next_run_requested(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under load the finished run's removal from the index can come after a fresh connect
    # already started the session's next run and requested it.
    client = await start_client(make_settings(**redis_target.settings, producer_interval_ms=10))
    producer = client.app[producer_key]
    removal = producer._unlist
    release = asyncio.Event()

    async def late(session_id: str) -> None:
        await release.wait()
        await removal(session_id)

    monkeypatch.setattr(producer, "_unlist", late)
    first = await client.get("/sse/connect", params={"sessionId": "again"})
    assert [e.event for e in await collect(first)] == ["message"] * 9 + ["finish"]
    second = await client.get("/sse/connect", params={"sessionId": "again"})
    release.set()
    assert [e.event for e in await collect(second, timeout_s=10)] == ["message"] * 9 + ["finish"]
