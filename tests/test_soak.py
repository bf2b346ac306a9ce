"""Soak: many connect/disconnect cycles leave the worker exactly as idle as before."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time

import pytest
import redis.asyncio as redis

from service.resources import hub_key

from app_clients import AppClient, MakeSettings, StartClient
from sse_reader import STREAM_OPENED
from waiting import wait_for

pytestmark = [pytest.mark.soak, pytest.mark.redis, pytest.mark.timeout(240)]

CYCLES = 20_000
WARMUP_CYCLES = 2_000
PARALLEL = 40
SESSIONS = 1_000
# After warm-up the worker's RSS settles: about 1 MiB of growth was measured over the 18,000
# measured cycles (allocator and interpreter caches). 8 MiB is the bound: a leak of 450 bytes
# per cycle or more fails it, and anything that kept a stream, a listener, a task or a
# response object alive (a few KiB each) would fail it many times over.
RSS_GROWTH_LIMIT_BYTES = 8 * 1024 * 1024


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def one_cycle(host: str, port: int, session_id: str) -> None:
    """Connect, read the stream's first frame, hang up: a raw client that keeps nothing.

    (aiohttp's TestClient remembers every response until teardown, which would show up
    here as growth that is not the worker's.)
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET /sse/connect?sessionId={session_id} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        await reader.readuntil(STREAM_OPENED)
    finally:
        writer.close()
        await writer.wait_closed()


async def run_cycles(client: AppClient, first: int, count: int) -> None:
    host, port = client.server.host, client.server.port
    assert port is not None, "the test server is started"

    async def worker(offset: int) -> None:
        for n in range(first + offset, first + count, PARALLEL):
            await one_cycle(host, port, f"soak-{n % SESSIONS}")

    await asyncio.gather(*(worker(offset) for offset in range(PARALLEL)))


async def test_connect_disconnect_cycles_leave_no_residue(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=redis_url, demo_runs=False)
    client = await start_client(settings)
    hub = client.app[hub_key]
    # The embedded producer's wake-up listener is the worker's only listener when idle.
    idle_listeners, idle_channels = hub.listener_count, hub.channel_count

    async def idle() -> bool:
        session_channels = await redis_client.pubsub_channels("sse:{*")
        return (
            hub.listener_count == idle_listeners
            and hub.channel_count == idle_channels
            and session_channels == []
        )

    await run_cycles(client, 0, WARMUP_CYCLES)
    await wait_for(idle, timeout_s=10, interval_s=0.05)
    gc.collect()
    idle_tasks = len(asyncio.all_tasks())
    idle_rss = rss_bytes()

    started = time.monotonic()
    await run_cycles(client, WARMUP_CYCLES, CYCLES - WARMUP_CYCLES)
    elapsed_s = time.monotonic() - started
    await wait_for(idle, timeout_s=10, interval_s=0.05)
    gc.collect()

    assert len(asyncio.all_tasks()) == idle_tasks
    assert hub.stats.slow_listeners_dropped == 0
    growth = rss_bytes() - idle_rss
    print(f"{CYCLES - WARMUP_CYCLES} cycles: {elapsed_s:.1f}s, RSS growth {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT_BYTES
