"""Fan-out 1:1 (one stream per session) and broadcast 1:N (every stream on one session).

Events go through each contestant's own publish path: the service's (the script calls a
`Publisher` makes: log append plus PUBLISH in one Lua script) for sse-fanout and the naive
baseline, which therefore receive exactly the same Redis traffic; nchan's HTTP publisher
endpoint for nchan. The publisher runs in a process of its own (`bench/publish.py`), so its
work is neither on the receivers' event loop nor in the server's CPU figure; whatever the
publish path costs the server or its Redis is. Each session's events are published in order
by one lane; lanes run concurrently, pipelined, paced to the offered rate (0 = as fast as
they can go).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from .progress import Progress
from .publish import Plan, PublisherProcess, publisher_process
from .sse_client import close_all, open_many
from .stack import Worker, redis_cpu_s, wait_quiet
from .tally import Tally

DRAIN_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class DeliveryStep:
    """One measured step: `sessions` sessions, `streams_per_session` streams each."""

    scenario: str
    sessions: int
    streams_per_session: int
    events: int  # per session
    rate: float  # offered events/s over all sessions; 0 = unpaced


async def run_step(
    step: DeliveryStep, worker: Worker, client: redis.Redis, redis_url: str, progress: Progress
) -> dict[str, Any]:
    """Connect, publish (from publisher processes), wait for every `finish`, and report.

    The events before each session's last are measured; the `finish` events that end the
    streams are published after the measurement, so stream teardown (the same for every
    event count) does not weigh on the per-event figures of short steps.
    """
    session_ids = [secrets.token_hex(8) for _ in range(step.sessions)]
    wire, port = worker.publish_wire, worker.port
    measured = Plan(
        redis_url, session_ids, step.events - 1, step.rate, wire=wire, http_port=port,
        finish_last=False,
    )  # fmt: skip
    closing = Plan(
        redis_url, session_ids, 1, step.rate, wire=wire, http_port=port,
        first_seq=step.events - 1,
    )  # fmt: skip
    async with publisher_process(measured) as publisher:
        return await _measure(
            step, worker, client, progress,
            session_ids=session_ids, publisher=publisher, closing=closing,
        )  # fmt: skip


async def _measure(
    step: DeliveryStep,
    worker: Worker,
    client: redis.Redis,
    progress: Progress,
    *,
    session_ids: list[str],
    publisher: PublisherProcess,
    closing: Plan,
) -> dict[str, Any]:
    paths = [
        worker.stream_path(sid) for sid in session_ids for _ in range(step.streams_per_session)
    ]
    streams_total = len(paths)
    tally = Tally(streams_total, step.events)
    label = f"{worker.target} {step.scenario} C={streams_total} rate={step.rate or 'max'}"
    with progress.step(f"{label}: connect", streams_total) as bar:
        opened = await open_many(worker.port, paths, tally.sink, on_done=bar.advance)
    result: dict[str, Any] = {
        "scenario": step.scenario,
        "target": worker.target,
        "connections": streams_total,
        "sessions": step.sessions,
        "events_per_session": step.events,
        "offered_rate": step.rate,
        "connect_failures": opened.failed,
        "connect_retries": opened.retries,
    }
    if opened.failed:
        result["failure"] = opened.failure
    tally.expect_streams(len(opened.streams))
    await publisher.ready()
    await wait_quiet(worker)
    cpu_before = worker.cpu_s()
    generator_cpu_before = time.process_time()
    redis_cpu_before = await redis_cpu_s(client)
    started_ns = time.monotonic_ns()
    total = step.sessions * (step.events - 1)
    with progress.step(f"{label}: publish", total) as bar:
        sent = await publisher.run(bar.advance)
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await tally.until_received(len(opened.streams) * (step.events - 1))
    except TimeoutError:
        result["drain_timeout"] = True
    worker_cpu = worker.cpu_s() - cpu_before
    generator_cpu = time.process_time() - generator_cpu_before
    redis_cpu = await redis_cpu_s(client) - redis_cpu_before
    deliveries = tally.received
    elapsed_s = max(1e-9, (tally.last_ns - started_ns) / 1e9)
    failures = await _close_streams(closing, tally, result)
    await close_all(opened.streams)
    failures += sent.failures
    if failures:
        result.setdefault("failure", f"{failures} publishes failed, first: {sent.failure}")
    result.update(
        publish_rate=round(total / max(1e-9, (sent.finished_ns - started_ns) / 1e9), 1),
        publish_failures=failures,
        deliveries=deliveries,  # in the measured window: every event but the `finish`
        deliveries_per_s=round(deliveries / elapsed_s, 1),
        worker_cpu_s=round(worker_cpu, 3),
        worker_cpu_us_per_delivery=round(worker_cpu * 1e6 / max(1, deliveries), 2),
        # Deliveries per second of worker CPU: what one core could deliver, whoever else
        # (generator, publisher, Redis) shared the machine during the step.
        worker_capacity_per_s=round(deliveries / worker_cpu, 1) if worker_cpu > 0 else 0.0,
        # The server and, when its design includes one, its Redis: what the whole
        # deployment spends per 1,000 events, wherever its publish path does its work.
        server_redis_cpu_ms_per_1000=round(
            (worker_cpu + (redis_cpu if worker.uses_redis else 0.0)) * 1e6 / max(1, deliveries),
            2,
        ),
        # Where the machine's CPU went while events flowed: who was the bottleneck.
        generator_cpu_s=round(generator_cpu, 3),
        publisher_cpu_s=round(sent.cpu_s, 3),
        redis_cpu_s=round(redis_cpu, 3),
        wall_s=round(elapsed_s, 3),
        **tally.summary(),
    )
    return result


async def _close_streams(closing: Plan, tally: Tally, result: dict[str, Any]) -> int:
    """Publish every session's `finish` and wait for all streams to end; return failures."""
    async with publisher_process(closing) as publisher:
        await publisher.ready()
        sent = await publisher.run(lambda _: None)
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await tally.all_finished
    except TimeoutError:
        result["drain_timeout"] = True
    return sent.failures
