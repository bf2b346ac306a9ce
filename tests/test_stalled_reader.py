"""A client that stops reading during a replay: dropped within the write deadline, memory bounded.

A real worker process replays an 8 MiB log to raw sockets that never read. The whole log must
never sit in the worker's memory, and each such stream must end as `slow` once a write has
waited `write_timeout_s` for the socket to drain.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from service.keys import Keys
from service.publisher import Publisher

from redis_process import free_port
from stack_processes import Worker, service_env
from waiting import wait_for

pytestmark = pytest.mark.redis

EVENT_BYTES = 64 * 1024
EVENTS = 128  # 8 MiB of log
STALLED = 4
WRITE_TIMEOUT_S = 1.0


def rss_kib(pid: int) -> int:
    """The process's resident set size now."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[Worker]:
    port = free_port()
    child = Worker(
        "worker",
        [sys.executable, "-m", "service", "serve"],
        service_env(
            redis_url=redis_url,
            port=port,
            demo_runs="false",
            write_timeout_s=WRITE_TIMEOUT_S,
            session_ttl_s=300,
        ),
        tmp_path / "worker.log",
        port=port,
    )
    child.start()
    try:
        yield child
    finally:
        child.stop()


async def slow_streams_ended(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    match = re.search(r'^sse_streams_ended_total\{reason="slow"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def open_stalled(port: int, last_event_id: str) -> socket.socket:
    """A connection that asks to resume the session and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /sse/connect?sessionId=big HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Accept: text/event-stream\r\nLast-Event-ID: {last_event_id}\r\n\r\n".encode()
    )
    return sock


async def test_stalled_readers_of_a_long_replay_are_dropped_and_memory_stays_bounded(
    worker: Worker,
    redis_client: redis.Redis,
) -> None:
    publisher = Publisher(redis_client, Keys(), session_ttl_s=300, log_maxlen=10_000)
    first = await publisher.publish("big", "", "start")
    for n in range(EVENTS):
        await publisher.publish("big", "", f"{n:08d}" + "x" * (EVENT_BYTES - 8))
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{worker.url}/readyz") as response:
                    return response.status == 200
            return False

        await wait_for(ready, timeout_s=15, interval_s=0.05)
        assert worker.process is not None
        pid = worker.process.pid
        baseline_kib = rss_kib(pid)
        peak_kib = baseline_kib
        sockets = [open_stalled(worker.port, first.event_id) for _ in range(STALLED)]
        try:

            async def all_dropped() -> bool:
                nonlocal peak_kib
                peak_kib = max(peak_kib, rss_kib(pid))
                return await slow_streams_ended(http, worker.url) == STALLED

            # Dropped a write deadline or so after their socket filled; never kept for good.
            await wait_for(all_dropped, timeout_s=20, interval_s=0.05)
        finally:
            for sock in sockets:
                sock.close()
    grown_mib = (peak_kib - baseline_kib) / 1024
    # The old replay held each stalled stream's whole log, joined, in memory (~24 MiB each).
    assert grown_mib < 24, f"worker grew by {grown_mib:.1f} MiB for {STALLED} stalled readers"
    assert "dropping the client as slow" in worker.log_text()
