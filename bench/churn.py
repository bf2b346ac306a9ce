"""Churn: connect → first event → close, over and over, many clients at once.

What a reconnect storm costs a server. Each client loops: open a stream on a fresh
session; once the response headers are in, have the publisher process publish one event
to that session; wait for it; hang up; wait until the connection is gone; again. Every
contestant is driven the same way, through its own publish path:

- sse-fanout subscribes before it answers and replays its log after, and the naive
  baseline confirms its subscription before it answers, so an event published after the
  headers cannot be missed;
- nchan keeps the message in the channel and its subscriber location starts at the oldest
  kept message, so neither can it.

Publishing after the headers (not from a demo run, nor in the handler) keeps the publisher
out of the server's work, except for the publish itself, which is each design's own cost
and lands where the design puts it: Redis for sse-fanout and naive, nginx for
nchan-memory, both for nchan-redis. A second phase publishes the same number of events
at the same rate to fresh sessions with nobody connected, so the publish path's own share
of each cycle is measured too and can be taken out.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis

from .progress import Progress
from .publish import Plan, PublisherProcess, Report, publisher_process
from .sse_client import SSEStream, open_stream
from .stack import Worker, redis_cpu_s, wait_quiet
from .tally import id_position, percentile_ms

CYCLE_TIMEOUT_S = 10.0
PACE_TICK_S = 0.005
CALIBRATION_MAX_S = 2.0


@dataclass
class Counts:
    """What the clients saw."""

    cycles: int = 0
    failures: int = 0
    missing: int = 0  # streams that ended or timed out before their event
    bad_events: int = 0  # an event that was not the one published (wrong data or id)
    failure: str = ""
    latencies_ns: list[int] = field(default_factory=list)
    last_ns: int = 0

    def fail(self, what: str) -> None:
        self.failures += 1
        self.failure = self.failure or what


class Batcher:
    """Session ids whose headers arrived, sent to the publisher once per loop iteration."""

    def __init__(self, send: Callable[[list[str]], None]) -> None:
        self._send = send
        self._pending: list[str] = []

    def add(self, session_id: str) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(session_id)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._send(pending)


async def one_cycle(worker: Worker, batcher: Batcher, counts: Counts) -> None:
    """One connect → first event → close."""
    session_id = secrets.token_hex(8)
    first: asyncio.Future[tuple[bytes, bytes, bytes]] = asyncio.get_running_loop().create_future()

    def sink(stream: SSEStream, event_id: bytes, event: bytes, data: bytes) -> None:
        del stream
        if not first.done():
            first.set_result((event_id, event, data))

    started = time.monotonic_ns()
    stream: SSEStream | None = None
    try:
        async with asyncio.timeout(CYCLE_TIMEOUT_S):
            stream = await open_stream(worker.port, worker.stream_path(session_id), sink)
            status = await stream.headers_received
            if status != 200:
                counts.fail(f"HTTP {status}")
                return
            batcher.add(session_id)
            ended: asyncio.Future[Any] = stream.closed
            await asyncio.wait([first, ended], return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                counts.missing += 1
                counts.fail("the stream ended before its first event")
                return
            _check(first.result(), counts)
            stream.close()
            await stream.closed
    except TimeoutError:
        counts.missing += 1
        counts.fail(f"no event within {CYCLE_TIMEOUT_S:g} s")
        return
    except OSError as error:
        counts.fail(f"{type(error).__name__}: {error}")
        return
    finally:
        if stream is not None:
            stream.close()
    now = time.monotonic_ns()
    counts.cycles += 1
    counts.latencies_ns.append(now - started)
    counts.last_ns = now


def _check(received: tuple[bytes, bytes, bytes], counts: Counts) -> None:
    """The first event must be the published one: sequence 0, unnamed, with a valid id."""
    event_id, event, data = received
    try:
        id_position(event_id)
        seq = int(data.partition(b" ")[0])
    except ValueError:
        seq = -1
    if seq != 0 or event:
        counts.bad_events += 1
        counts.failure = counts.failure or f"unexpected first event {received!r}"


async def _client(worker: Worker, batcher: Batcher, counts: Counts, until: float) -> None:
    while time.monotonic() < until:
        await one_cycle(worker, batcher, counts)


@dataclass(frozen=True, slots=True)
class _Usage:
    """CPU the server, its Redis and the generator used over a window."""

    server_s: float
    redis_s: float
    generator_s: float


@contextlib.asynccontextmanager
async def _stream_publisher(worker: Worker, redis_url: str) -> AsyncIterator[PublisherProcess]:
    plan = Plan(
        redis_url, [], events=1, rate=0, wire=worker.publish_wire, http_port=worker.port,
        stream=True,
    )  # fmt: skip
    async with publisher_process(plan) as publisher:
        await publisher.ready()
        yield publisher


async def run_churn(
    worker: Worker,
    client: redis.Redis,
    redis_url: str,
    progress: Progress,
    *,
    clients: int,
    duration_s: float,
) -> dict[str, Any]:
    """Churn for `duration_s` with `clients` in parallel, then measure the publish share."""
    counts = Counts()
    label = f"{worker.target} churn clients={clients}"
    async with _stream_publisher(worker, redis_url) as publisher:
        await wait_quiet(worker)
        before = await _usage(worker, client)
        publisher.go()
        started = time.monotonic_ns()
        until = time.monotonic() + duration_s
        batcher = Batcher(publisher.send)
        with progress.step(f"{label}: {duration_s:g} s", 1) as bar:
            await asyncio.gather(*(_client(worker, batcher, counts, until) for _ in range(clients)))
            bar.advance()
        sent = await publisher.end()
        await wait_quiet(worker, timeout_s=5.0)
        used = _since(before, await _usage(worker, client))
    elapsed_s = max(1e-9, ((counts.last_ns or time.monotonic_ns()) - started) / 1e9)
    rate = counts.cycles / elapsed_s
    calibration = await _publish_only(
        worker, client, redis_url, rate, min(duration_s, CALIBRATION_MAX_S)
    )
    result = _result(worker, counts, used, sent, elapsed_s=elapsed_s, clients=clients)
    result.update(calibration)
    server_redis = result["server_redis_cpu_ms_per_cycle"]
    result["server_redis_cpu_ms_per_cycle_without_publish"] = round(
        max(0.0, server_redis - calibration["publish_server_redis_cpu_ms_per_event"]), 4
    )
    return result


def _result(
    worker: Worker, counts: Counts, used: _Usage, sent: Report, *, elapsed_s: float, clients: int
) -> dict[str, Any]:
    cycles = max(1, counts.cycles)
    redis_s = used.redis_s if worker.uses_redis else 0.0
    latencies = sorted(counts.latencies_ns)
    result: dict[str, Any] = {
        "scenario": "churn",
        "target": worker.target,
        "clients": clients,
        "cycles": counts.cycles,
        "cycles_per_s": round(counts.cycles / elapsed_s, 1),
        "failures": counts.failures + sent.failures,
        "missing": counts.missing,
        "bad_events": counts.bad_events,
        "published": sent.published,
        "cycle_p50_ms": round(percentile_ms(latencies, 0.5), 2),
        "cycle_p99_ms": round(percentile_ms(latencies, 0.99), 2),
        "worker_cpu_s": round(used.server_s, 3),
        "worker_cpu_ms_per_cycle": round(used.server_s * 1000 / cycles, 4),
        "redis_cpu_s": round(used.redis_s, 3),
        "server_redis_cpu_ms_per_cycle": round((used.server_s + redis_s) * 1000 / cycles, 4),
        # How busy each side was: a server core far from full means the generator set the
        # pace, and cycles/s then understates what the server could do.
        "server_core_share": round((used.server_s + redis_s) / elapsed_s, 2),
        "generator_core_share": round((used.generator_s + sent.cpu_s) / elapsed_s, 2),
        "wall_s": round(elapsed_s, 3),
    }
    failure = counts.failure or sent.failure
    if failure:
        result["failure"] = failure
    return result


async def _publish_only(
    worker: Worker, client: redis.Redis, redis_url: str, rate: float, duration_s: float
) -> dict[str, Any]:
    """Publish at `rate` to fresh sessions nobody listens to: the publish path's own cost."""
    events = max(1, round(rate * duration_s))
    async with _stream_publisher(worker, redis_url) as publisher:
        await wait_quiet(worker)
        before = await _usage(worker, client)
        publisher.go()
        started, sent_count = time.monotonic(), 0
        while sent_count < events:
            due = min(events, int((time.monotonic() - started) * rate) + 1)
            if due > sent_count:
                publisher.send([secrets.token_hex(8) for _ in range(due - sent_count)])
                sent_count = due
            await asyncio.sleep(PACE_TICK_S)
        report = await publisher.end()
        await wait_quiet(worker, timeout_s=5.0)
        used = _since(before, await _usage(worker, client))
    redis_s = used.redis_s if worker.uses_redis else 0.0
    published = max(1, report.published)
    out: dict[str, Any] = {
        "publish_only_events": report.published,
        "publish_worker_cpu_ms_per_event": round(used.server_s * 1000 / published, 4),
        "publish_server_redis_cpu_ms_per_event": round(
            (used.server_s + redis_s) * 1000 / published, 4
        ),
    }
    if report.failures:
        out["publish_only_failures"] = report.failures
    return out


async def _usage(worker: Worker, client: redis.Redis) -> _Usage:
    return _Usage(worker.cpu_s(), await redis_cpu_s(client), time.process_time())


def _since(before: _Usage, after: _Usage) -> _Usage:
    return _Usage(
        after.server_s - before.server_s,
        after.redis_s - before.redis_s,
        after.generator_s - before.generator_s,
    )
