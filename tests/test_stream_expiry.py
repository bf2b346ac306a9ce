"""A stream ends when its subscriber's token expires, however busy it is, after one last event.

Driven with stand-ins, so the stream's task can be kept busy on every turn of its loop: a
client that is behind always has events queued, and they must not keep it alive.
"""

from __future__ import annotations

import asyncio
import time

from service.envelope import Delivery
from service.mailbox import Incoming, StreamEnd
from service.stream import UNAUTHORIZED_FRAME, EventStream, StreamPlan

from sse_reader import SSEParser


class Response:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(data)
        await asyncio.sleep(0)  # a socket that takes its time


class NeverEmpty:
    """A listener that always has another event queued when the stream asks."""

    def __init__(self) -> None:
        self.ended: StreamEnd | None = None
        self.direct = None
        self.on_end = None
        self.taken = 0
        self.waiting_since: float | None = None
        self.taken_since: float | None = None

    async def take(self, timeout_s: float) -> list[Incoming]:
        del timeout_s
        self.taken += 1
        await asyncio.sleep(0)
        n = self.taken
        return [Incoming(f"{n}-0\n\ntick {n}".encode())]


class Sessions:
    async def read_page(self, session_id: str, start: str, count: int) -> list[Delivery]:
        del session_id, start, count
        return []

    async def ttl_ms(self, session_id: str) -> int:
        del session_id
        return 60_000


def plan(access_ends_at: float | None) -> StreamPlan:
    return StreamPlan(
        session_id="s",
        replay_after="0-0",
        detect_gap=False,
        ttl_ms=60_000,
        retry_ms=500,
        heartbeat_interval_s=5.0,
        write_timeout_s=5.0,
        access_ends_at=access_ends_at,
    )


async def test_a_stream_that_is_always_busy_still_ends_when_access_ends() -> None:
    response, listener = Response(), NeverEmpty()
    stream = EventStream(
        response,  # type: ignore[arg-type]
        listener,  # type: ignore[arg-type]
        Sessions(),  # type: ignore[arg-type]
        plan(time.monotonic() + 0.2),
        direct_writes=False,
    )
    async with asyncio.timeout(10):
        reason = await stream.run()
    assert reason is StreamEnd.UNAUTHORIZED
    assert response.writes[-1] == UNAUTHORIZED_FRAME
    events = SSEParser().feed(b"".join(response.writes).decode())
    assert events[-1].event == "unauthorized"
    assert events[-1].id == events[-2].id, "the last event keeps the resume point"
    ticks = [e.data for e in events[:-1]]
    assert len(ticks) > 5
    assert ticks == [f"tick {n}" for n in range(1, len(ticks) + 1)]


async def test_an_access_deadline_already_past_ends_the_stream_at_once() -> None:
    response = Response()
    stream = EventStream(
        response,  # type: ignore[arg-type]
        NeverEmpty(),  # type: ignore[arg-type]
        Sessions(),  # type: ignore[arg-type]
        plan(time.monotonic() - 1),
        direct_writes=False,
    )
    async with asyncio.timeout(5):
        assert await stream.run() is StreamEnd.UNAUTHORIZED
    events = SSEParser().feed(b"".join(response.writes).decode())
    assert [e.event for e in events] == ["unauthorized"]
