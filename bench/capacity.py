"""Capacity: hold C idle streams on one fresh server; its memory per stream, Redis connections.

Memory is the proportional set size (PSS, /proc/<pid>/smaps_rollup) summed over the
server's processes: nginx's master and worker share pages, and PSS counts a shared page
once across its sharers where RSS would count it in each. RSS is kept alongside.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import redis.asyncio as redis

from . import procs
from .progress import Progress
from .sse_client import SSEStream, close_all, open_many
from .stack import Worker, wait_quiet, worker_redis_connections


def _ignore(stream: SSEStream, event_id: bytes, event: bytes, data: bytes) -> None:
    del stream, event_id, event, data


async def run_capacity(
    connections: int, worker: Worker, client: redis.Redis, progress: Progress, hold_s: float
) -> dict[str, Any]:
    """Open `connections` streams (one session each), hold them, measure, hang up."""
    await wait_quiet(worker)
    pss_before, rss_before = worker.pss_kib(), procs.tree_rss_kib(worker.pid)
    redis_before = await worker_redis_connections(client)
    redis_memory_before = (await client.info("memory"))["used_memory"]
    paths = [worker.stream_path(secrets.token_hex(8)) for _ in range(connections)]
    started = time.monotonic()
    with progress.step(f"{worker.target} capacity C={connections}: connect", connections) as bar:
        opened = await open_many(worker.port, paths, _ignore, on_done=bar.advance)
    connect_s = time.monotonic() - started
    await asyncio.sleep(hold_s)  # hold the streams a while: none may drop
    await wait_quiet(worker)  # and let the server settle before reading its memory
    held = sum(1 for stream in opened.streams if not stream.closed.done())
    pss_after, rss_after = worker.pss_kib(), procs.tree_rss_kib(worker.pid)
    redis_after = await worker_redis_connections(client)
    redis_memory_after = (await client.info("memory"))["used_memory"]
    await close_all(opened.streams)
    result: dict[str, Any] = {
        "scenario": "capacity",
        "target": worker.target,
        "connections": connections,
        "held": held,
        "connect_failures": opened.failed,
        "connect_retries": opened.retries,
        "connects_per_s": round(len(opened.streams) / max(connect_s, 1e-9), 1),
        "server_processes": len(procs.tree(worker.pid)),
        "worker_pss_before_mib": round(pss_before / 1024, 1),
        "worker_pss_after_mib": round(pss_after / 1024, 1),
        "worker_pss_kib_per_stream": round((pss_after - pss_before) / max(1, held), 2),
        "worker_rss_after_mib": round(rss_after / 1024, 1),
        "worker_kib_per_stream": round((rss_after - rss_before) / max(1, held), 2),
        "worker_redis_connections_before": redis_before,
        "worker_redis_connections": redis_after,
        "redis_kib_per_stream": round(
            (redis_memory_after - redis_memory_before) / 1024 / max(1, held), 2
        ),
    }
    if opened.failed:
        result["failure"] = opened.failure
    return result
