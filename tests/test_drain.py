"""Graceful drain: shutdown ends open streams at once, refuses new ones, hands runs back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from service import resources as r
from service.keys import Keys
from service.producer import Producer
from service.redis.connections import RedisOpener
from service.tasks import cancel_and_wait

from app_clients import MakeSettings, StartClient
from redis_process import free_port
from redis_state import logged_ids
from sse_reader import STREAM_OPENED, SSEParser, read_events
from stack_processes import Worker, service_env
from waiting import wait_for


async def test_shutdown_ends_open_streams_cleanly_and_at_once(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    # One event a minute: only the drain can end these streams within the test. No pacing:
    # test_drain_pacing.py covers that.
    client = await start_client(
        make_settings(producer_interval_ms=60_000, drain_spread=0.0), fake_opener
    )
    responses = [
        await client.get("/sse/connect", params={"sessionId": f"drain-{n}"}) for n in range(5)
    ]
    parsers = [SSEParser() for _ in responses]
    for response, parser in zip(responses, parsers, strict=True):
        parser.feed((await response.content.readuntil(STREAM_OPENED)).decode())

    started = time.monotonic()
    closing = asyncio.create_task(client.server.close())
    for response, parser in zip(responses, parsers, strict=True):
        # The stream ends like a finished response (no payload error), so EventSource retries.
        async with asyncio.timeout(2):
            events = [event async for event in read_events(response, parser)]
        assert [e.event for e in events] in ([], ["message"])
        assert parser.retry_ms == 500
    async with asyncio.timeout(5):
        await closing
    assert time.monotonic() - started < 2.0


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_the_drain_line_counts_the_streams_it_ends(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Three streams on two sessions; the embedded producer listens for wake-ups too.
    client = await start_client(make_settings(producer_interval_ms=60_000), fake_opener)
    responses = [
        await client.get("/sse/connect", params={"sessionId": session_id})
        for session_id in ("one", "one", "two")
    ]
    for response in responses:
        await response.content.readuntil(STREAM_OPENED)
    with caplog.at_level(logging.INFO, logger="service"):
        await r.drain_streams(client.app)
    drain_lines = [m for m in caplog.messages if m.startswith("draining: ending ")]
    assert drain_lines == [drain_lines[0]]
    assert drain_lines[0].startswith("draining: ending 3 open streams")


async def test_a_draining_worker_refuses_new_streams_with_503(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(), fake_opener)
    await r.drain_streams(client.app)
    response = await client.get("/sse/connect", params={"sessionId": "late"})
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["error"] == "unavailable"
    # Probes still answer: the process is alive until its cleanup finishes.
    assert (await client.get("/healthz")).status == 200


@pytest.mark.redis
async def test_a_closing_producer_hands_its_run_to_another_at_once(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    # With a 30 s lease, a takeover that waited for expiry could not finish in time.
    settings = make_settings(
        redis_url=redis_url,
        producer_interval_ms=100,
        producer_lease_ms=30_000,
        producer_poll_ms=50,
    )
    first = await start_client(settings)
    response = await first.get("/sse/connect", params={"sessionId": "handover"})
    assert response.status == 200

    async def three_logged() -> bool:
        return len(await logged_ids(redis_client, "handover")) >= 3

    await wait_for(three_logged)
    second = await start_client(settings)
    second_producer: Producer = second.app[r.producer_key]
    lease_before = await redis_client.get(Keys().lease("handover"))
    response.close()
    await first.close()

    async def all_logged() -> bool:
        return len(await logged_ids(redis_client, "handover")) == 10

    await wait_for(all_logged, timeout_s=5)
    assert second_producer.events_published >= 1
    assert await redis_client.get(Keys().lease("handover")) != lease_before
    ids = await logged_ids(redis_client, "handover")
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


async def test_app_shutdown_with_nothing_open_is_quick(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(), fake_opener)
    started = time.monotonic()
    async with asyncio.timeout(5):
        await client.close()
    assert time.monotonic() - started < 1.0


async def test_cancel_and_wait_works_in_a_task_whose_own_cancel_was_handled() -> None:
    # aiohttp's run_app cancels its main task on SIGTERM and then runs the app's cleanup in it.
    async def clean_up_after_being_cancelled() -> bool:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        child = asyncio.create_task(asyncio.sleep(3600))
        await cancel_and_wait([child])
        return child.cancelled()

    main = asyncio.create_task(clean_up_after_being_cancelled())
    await asyncio.sleep(0)
    main.cancel()
    async with asyncio.timeout(5):
        assert await main is True


@pytest.mark.redis
async def test_sigterm_on_a_worker_with_its_producer_hands_the_run_over(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    lease = {"producer_interval_ms": 150, "producer_lease_ms": 30_000, "producer_poll_ms": 50}
    worker = Worker(
        "worker",
        [sys.executable, "-m", "service", "serve"],
        service_env(redis_url=redis_url, port=free_port(), drain_timeout_s=5, **lease),
        tmp_path / "worker.log",
    )
    worker.port = int(worker.env["SSE_PORT"])
    worker.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{worker.url}/readyz") as response:
                        return response.status == 200
                return False

            await wait_for(ready, timeout_s=15, interval_s=0.05)
            async with http.get(
                f"{worker.url}/sse/connect", params={"sessionId": "moving"}
            ) as response:
                assert response.status == 200

                async def two_logged() -> bool:
                    return len(await logged_ids(redis_client, "moving")) >= 2

                await wait_for(two_logged)
                # Another worker's producer is ready to take over, but only a hand-back lets
                # it do so before the 30 s lease runs out.
                await start_client(make_settings(redis_url=redis_url, **lease))
                worker.send(signal.SIGTERM)

                async def exited() -> bool:
                    return not worker.running

                await wait_for(exited, timeout_s=5)

        async def all_logged() -> bool:
            return len(await logged_ids(redis_client, "moving")) == 10

        await wait_for(all_logged, timeout_s=5)
        assert worker.process is not None
        assert worker.process.returncode == 0, worker.log_text()
        assert "handed back run of session moving" in worker.log_text()
    finally:
        worker.stop()
