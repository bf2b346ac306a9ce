"""Paced drain: on SIGTERM a worker ends its streams spread over time, finished sessions first,
each stream's last frame a `retry:` of its own (and, if set, a named event)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from service.drain_pacing import drain_schedule, farewell_frame, finished_first, pace
from service.envelope import FINISH_EVENT, RESERVED_EVENTS
from service.keys import Keys
from service.settings import SettingsError, build_settings, load_settings

from redis_process import free_port
from sse_reader import STREAM_OPENED, SSEParser
from stack_processes import Worker, service_env
from waiting import wait_for


def test_the_schedule_spreads_ends_evenly_over_the_window() -> None:
    assert drain_schedule(5, 2.0) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert drain_schedule(1, 2.0) == [0.0]
    assert drain_schedule(0, 2.0) == []
    assert drain_schedule(4, 0.0) == [0.0] * 4  # no window: all at once


@dataclass
class FakeStream:
    session_id: str
    farewells: list[bytes] = field(default_factory=list)
    ended_at: float | None = None
    clock: list[float] = field(default_factory=[0.0].copy)

    def drain(self, farewell: bytes) -> None:
        self.farewells.append(farewell)
        self.ended_at = self.clock[0]


def test_streams_of_finished_sessions_go_first_in_their_order() -> None:
    streams = [FakeStream(s) for s in ("a", "b", "c", "d", "e")]
    ordered = finished_first(streams, {"d", "b"})
    assert [s.session_id for s in ordered] == ["b", "d", "a", "c", "e"]


async def test_pace_ends_each_stream_at_its_time_with_its_own_farewell() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.001)

    streams = [FakeStream(f"s{n}", clock=now) for n in range(101)]
    draws = iter(range(1000))

    def farewell() -> bytes:
        return f"retry: {next(draws)}\n".encode()

    await pace(streams, 1.0, farewell, sleep=sleep, clock=lambda: now[0])
    ends = [s.ended_at for s in streams]
    assert all(end is not None for end in ends)
    # Each at its slot (the tick is 10 ms), in order, the last at the window's end.
    for n, end in enumerate(ends):
        assert end is not None
        assert n / 100 - 1e-9 <= end <= n / 100 + 0.011
    assert len({s.farewells[0] for s in streams}) == 101  # one draw per stream


async def test_a_drain_that_falls_behind_catches_up_without_a_burst() -> None:
    now = [0.0]
    stalls = [0.5]  # the worker's loop is busy for half a second once

    async def sleep(seconds: float) -> None:
        now[0] += stalls.pop() if stalls else max(seconds, 0.001)

    streams = [FakeStream(f"s{n}", clock=now) for n in range(1001)]
    await pace(streams, 1.0, lambda: b"retry: 1\n", sleep=sleep, clock=lambda: now[0])
    ends = sorted(s.ended_at for s in streams if s.ended_at is not None)
    assert len(ends) == 1001
    # Planned: 1000 a second, 100 per 100 ms. After the stall, 500 are overdue: they go at
    # one and a half times the pace, never all at once.
    per_100ms = [0] * 20
    for end in ends:
        per_100ms[int(end * 10 + 1e-9)] += 1
    assert max(per_100ms) <= 2 * 100 + 1, per_100ms
    assert max(ends) <= 1.0 + 0.5 + 0.02  # caught up at half the pace again


async def test_a_drain_far_behind_ends_the_rest_at_its_deadline() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        del seconds
        now[0] += 0.25  # the loop is starved

    streams = [FakeStream(f"s{n}", clock=now) for n in range(1000)]
    await pace(streams, 1.0, lambda: b"retry: 1\n", finish_by_s=1.5, sleep=sleep,
               clock=lambda: now[0])  # fmt: skip
    ends = [s.ended_at for s in streams]
    assert all(end is not None and end <= 1.5 for end in ends), max(e or 0 for e in ends)


def test_the_farewell_is_a_spread_retry_and_the_drain_event_when_set() -> None:
    quiet = build_settings({"retry_ms": 1000, "retry_spread": 0.5})
    frames = {farewell_frame(quiet) for _ in range(200)}
    assert len(frames) > 50
    for frame in frames:
        parser = SSEParser()
        assert parser.feed(frame.decode()) == []  # no event: nothing for the application
        assert parser.retry_ms is not None
        assert 500 <= parser.retry_ms <= 1500
    told = build_settings({"retry_ms": 1000, "retry_spread": 0.0, "drain_event": "reconnect"})
    assert farewell_frame(told) == b"retry: 1000\nevent: reconnect\ndata: 1000\n\n"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"SSE_DRAIN_SPREAD": "0.95"}, "'drain_spread'"),
        ({"SSE_DRAIN_SPREAD": "-0.1"}, "'drain_spread'"),
        ({"SSE_DRAIN_EVENT": "re connect"}, "'drain_event'"),
        ({"SSE_DRAIN_EVENT": "finish"}, "'drain_event'"),
    ],
)
def test_bad_drain_settings_name_the_key(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(None, environ)


@pytest.mark.parametrize("name", sorted({*RESERVED_EVENTS, FINISH_EVENT, "message"}))
def test_a_drain_event_is_none_of_the_names_the_service_or_eventsource_give_a_meaning(
    name: str,
) -> None:
    # Settings sit below the event model, so they keep their own list; this holds it to it.
    with pytest.raises(SettingsError, match="'drain_event'"):
        build_settings({"drain_event": name})


# --- a real worker process --------------------------------------------------------------

STREAMS = 40
FINISHED = 8
DRAIN_TIMEOUT_S = 4.0


@dataclass
class Client:
    """One stream, read to its end: what it got and when it ended (monotonic)."""

    session_id: str
    parser: SSEParser = field(default_factory=SSEParser)
    events: list[str] = field(default_factory=list)
    tail: str = ""
    ended_at: float | None = None


async def follow(http: aiohttp.ClientSession, url: str, client: Client,
                 opened: asyncio.Event, counter: list[int]) -> None:  # fmt: skip
    async with http.get(f"{url}/sse/connect", params={"sessionId": client.session_id}) as response:
        assert response.status == 200
        head = await response.content.readuntil(STREAM_OPENED)
        client.parser.feed(head.decode())
        counter[0] += 1
        if counter[0] == STREAMS:
            opened.set()
        async for chunk in response.content.iter_any():
            text = chunk.decode()
            client.tail = (client.tail + text)[-200:]
            client.events += [e.event for e in client.parser.feed(text)]
    client.ended_at = time.monotonic()


@pytest.mark.redis
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spread", [0.5, 0.0])
async def test_sigterm_ends_streams_paced_finished_first_each_with_its_own_retry(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, spread: float
) -> None:
    port = free_port()
    worker = Worker(
        "worker",
        [sys.executable, "-m", "service", "serve"],
        service_env(
            redis_url=redis_url,
            port=port,
            demo_runs="false",
            session_ttl_s=120,
            drain_timeout_s=DRAIN_TIMEOUT_S,
            drain_spread=spread,
            retry_ms=1000,
            retry_spread=0.5,
            drain_event="reconnect",
        ),
        tmp_path / "worker.log",
        port=port,
    )
    worker.start()
    clients = [Client(f"pace-{n:02d}") for n in range(STREAMS)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{worker.url}/readyz") as response:
                        return response.status == 200
                return False

            await wait_for(ready, timeout_s=15, interval_s=0.05)
            opened, counter = asyncio.Event(), [0]
            readers = [
                asyncio.create_task(follow(http, worker.url, c, opened, counter)) for c in clients
            ]
            async with asyncio.timeout(10):
                await opened.wait()
            # The last eight sessions have finished, their `finish` not yet at the stream.
            finished = {c.session_id for c in clients[-FINISHED:]}
            for session_id in finished:
                await redis_client.hset(Keys().session(session_id), "finished", "1-0")
            signalled = time.monotonic()
            worker.send(signal.SIGTERM)
            async with asyncio.timeout(DRAIN_TIMEOUT_S + 5):
                await asyncio.gather(*readers)
            assert worker.process is not None
            async with asyncio.timeout(5):
                while worker.running:  # noqa: ASYNC110 - another process
                    await asyncio.sleep(0.05)
            exited = time.monotonic()
    finally:
        worker.stop()
    assert worker.process is not None
    assert worker.process.returncode == 0, worker.log_text()
    assert exited - signalled < DRAIN_TIMEOUT_S + 2
    ends = {c.session_id: (c.ended_at or 0) - signalled for c in clients}
    window_s = spread * DRAIN_TIMEOUT_S
    if spread:
        # Spread over the window: not in one instant, none long after it.
        assert max(ends.values()) - min(ends.values()) >= 0.7 * window_s, ends
        assert max(ends.values()) <= window_s + 1.0, ends
        # No tenth of the window ends more than a few streams.
        tenths = [0] * 10
        for end in ends.values():
            tenths[min(9, int(end / window_s * 10))] += 1
        assert max(tenths) <= STREAMS // 10 + 3, tenths
        # Finished sessions' streams first.
        assert (
            max(ends[s] for s in finished)
            <= min(end for s, end in ends.items() if s not in finished) + 0.05
        ), ends
    else:
        assert max(ends.values()) - min(ends.values()) < 0.5, ends
    retries = set()
    for client in clients:
        # The last frame: the drain event, preceded by this stream's own retry.
        assert client.events[-1:] == ["reconnect"], (client.session_id, client.tail)
        assert client.tail.endswith(f"event: reconnect\ndata: {client.parser.retry_ms}\n\n")
        assert client.parser.retry_ms is not None
        assert 500 <= client.parser.retry_ms <= 1500
        retries.add(client.parser.retry_ms)
    assert len(retries) > STREAMS // 2
