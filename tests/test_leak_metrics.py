"""Leak metrics of a real worker process: open files against streams, bytes held for clients that
stopped reading, and the age of the oldest event waiting to be written."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from service.keys import Keys
from service.leak_metrics import open_fd_count
from service.publisher import Publisher

from redis_process import free_port
from sse_reader import STREAM_OPENED
from stack_processes import Worker, service_env
from waiting import wait_for

pytestmark = pytest.mark.redis

STREAMS = 40
EVENT_BYTES = 64 * 1024
EVENTS = 128  # 8 MiB


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[Worker]:
    port = free_port()
    child = Worker(
        "worker",
        [sys.executable, "-m", "service", "serve"],
        # A long write deadline: the stalled client must stay, not be dropped as slow.
        service_env(
            redis_url=redis_url, port=port, demo_runs="false", write_timeout_s=60, session_ttl_s=300
        ),
        tmp_path / "worker.log",
        port=port,
    )
    child.start()
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture
async def http(worker: Worker) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{worker.url}/readyz") as response:
                    return response.status == 200
            return False

        await wait_for(ready, timeout_s=15, interval_s=0.05)
        yield session


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_open_fds_counts_this_process_descriptors(tmp_path: Path) -> None:
    before = open_fd_count()
    assert before is not None
    assert before > 0
    with (tmp_path / "a").open("w"), (tmp_path / "b").open("w"):
        assert open_fd_count() == before + 2
    assert open_fd_count() == before
    assert open_fd_count(tmp_path / "missing") is None


async def test_open_fds_follow_open_streams_up_and_back_down(
    worker: Worker, http: aiohttp.ClientSession
) -> None:
    baseline = await scrape(http, worker.url)
    assert baseline["sse_open_fds"] > 0
    assert baseline["sse_open_fds_limit"] >= baseline["sse_open_fds"]
    responses = []
    async with aiohttp.ClientSession() as clients:
        for n in range(STREAMS):
            response = await clients.get(f"{worker.url}/sse/connect?sessionId=fd-{n}")
            responses.append(response)
            async with asyncio.timeout(5):
                await response.content.readuntil(STREAM_OPENED)
        during = await scrape(http, worker.url)
        assert during["sse_open_streams"] == STREAMS
        # One socket per stream; a few Redis connections may open on the way.
        grown = during["sse_open_fds"] - baseline["sse_open_fds"]
        assert STREAMS <= grown <= STREAMS + 8, (baseline, during)
        for response in responses:
            response.close()

    async def back_down() -> bool:
        now = await scrape(http, worker.url)
        return now["sse_open_streams"] == 0 and (
            now["sse_open_fds"] <= baseline["sse_open_fds"] + 2
        )

    await wait_for(back_down, timeout_s=10, interval_s=0.1)


def open_stalled(port: int, session_id: str) -> socket.socket:
    """A stream connection that reads its head and then stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /sse/connect?sessionId={session_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    sock.settimeout(5)
    head = b""
    while STREAM_OPENED not in head:
        head += sock.recv(4096)
    return sock


async def test_a_client_that_stops_reading_shows_as_buffered_bytes_and_an_aging_event(
    worker: Worker, http: aiohttp.ClientSession, redis_client: redis.Redis
) -> None:
    idle = await scrape(http, worker.url)
    assert idle["sse_client_buffered_bytes"] == 0
    assert idle["sse_oldest_unsent_event_age_seconds"] == 0
    sock = open_stalled(worker.port, "stalled")
    try:
        publisher = Publisher(redis_client, Keys(), session_ttl_s=300, log_maxlen=1000)
        for n in range(EVENTS):  # more than the kernel's socket buffers hold
            await publisher.publish("stalled", "", f"{n:08d}" + "x" * (EVENT_BYTES - 8))

        async def stuck() -> bool:
            now = await scrape(http, worker.url)
            return (
                now["sse_client_buffered_bytes"] >= EVENT_BYTES
                and now["sse_oldest_unsent_event_age_seconds"] >= 0.5
            )

        await wait_for(stuck, timeout_s=10, interval_s=0.1)
        first = (await scrape(http, worker.url))["sse_oldest_unsent_event_age_seconds"]
        await asyncio.sleep(0.3)  # the age must grow while nothing drains
        assert (await scrape(http, worker.url))["sse_oldest_unsent_event_age_seconds"] > first

        # The client reads again: everything goes out and both gauges fall back to zero.
        sock.setblocking(False)
        received = 0

        async def drained() -> bool:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
            if received < EVENTS * EVENT_BYTES:
                await asyncio.sleep(0.01)
                return False
            now = await scrape(http, worker.url)
            return (
                now["sse_client_buffered_bytes"] == 0
                and now["sse_oldest_unsent_event_age_seconds"] == 0
            )

        await wait_for(drained, timeout_s=15, interval_s=0.01)
    finally:
        sock.close()
