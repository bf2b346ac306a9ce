"""Paced drain: a worker that shuts down ends its streams spread over time, not all at once.

Ended in the same millisecond, every client of a worker would reconnect to the others in one
burst, however its `retry:` was drawn. So on shutdown (after the worker stopped accepting)
the open streams are ended one after another, evenly over `drain_spread` x
`drain_timeout_s`, streams of finished sessions first (their reconnect is answered `204` at
once, the cheapest for the workers that take them). Each stream's last frame is a `retry:`
of its own draw, optionally followed by a named event (`drain_event`) that lets an
application tell a deploy from a failure. What is left after the window (a stream still
being set up) is ended by the hub at the end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from redis.exceptions import RedisError

from . import sse
from .jitter import retry_delay_ms
from .keys import Keys
from .redis.connections import RedisClient
from .settings import Settings

log = logging.getLogger(__name__)

# Streams are ended in slices at most this far apart: one timer per slice, not per stream.
TICK_S = 0.01
# A drain that fell behind its schedule (its loop busy) ends streams at most CATCH_UP times
# faster than planned until it has caught up, and at once no more than the plan ends in
# BURST_S: so in any 100 ms it ends at most twice what the plan does, and the reconnects of
# its clients arrive spread the same way.
CATCH_UP = 1.5
BURST_S = 0.05


class Drainable(Protocol):
    """What the pacer needs of a stream."""

    @property
    def session_id(self) -> str:
        """The stream's session."""

    def drain(self, farewell: bytes) -> None:
        """End the stream for shutdown, its last frame `farewell`."""


def farewell_frame(settings: Settings) -> bytes:
    """A stream's last frame on shutdown: its own `retry:`, then the drain event if set."""
    delay_ms = retry_delay_ms(settings.retry_ms, settings.retry_spread)
    frame = sse.retry(delay_ms)
    if settings.drain_event:
        frame += sse.Event(data=str(delay_ms), event=settings.drain_event).encode()
    return frame


def shutdown_grace_s(settings: Settings) -> float:
    """Half of what `drain_timeout_s` leaves after the pacing window.

    A worker too busy to keep its schedule may take the first half to end its last streams
    (`pace`'s `finish_by_s`), the runner gives their handlers the second: the drain as a
    whole never takes longer than `drain_timeout_s`.
    """
    return settings.drain_timeout_s * (1 - settings.drain_spread) / 2


def drain_schedule(count: int, window_s: float) -> list[float]:
    """When each of `count` streams ends, in seconds from the start: evenly over the window.

    The first ends at once and the last at the window's end, so a window of 0 ends them
    all at once (the behaviour without pacing).
    """
    if count <= 1 or window_s <= 0:
        return [0.0] * count
    step = window_s / (count - 1)
    return [n * step for n in range(count)]


def finished_first(streams: Sequence[Drainable], finished: set[str]) -> list[Drainable]:
    """`streams` with those of finished sessions first, each group in its given order."""
    return sorted(streams, key=lambda stream: stream.session_id not in finished)


async def finished_sessions(
    redis: RedisClient, keys: Keys, session_ids: set[str], timeout_s: float
) -> set[str]:
    """The sessions among `session_ids` that have finished; empty if Redis cannot tell in time.

    One pipelined read (a field of each session's hash); the drain never waits longer than
    `timeout_s` for it, and without an answer it goes on in the streams' own order.
    """
    if not session_ids:
        return set()
    ordered = sorted(session_ids)
    try:
        async with asyncio.timeout(timeout_s):
            pipe = redis.pipeline(transaction=False)
            for session_id in ordered:
                pipe.hget(keys.session(session_id), "finished")
            replies = await pipe.execute()
    except (RedisError, OSError, TimeoutError) as error:
        log.info("draining: cannot tell finished sessions apart (%s); ending in order", error)
        return set()
    return {sid for sid, reply in zip(ordered, replies, strict=True) if reply}


async def pace(
    streams: Sequence[Drainable],
    window_s: float,
    farewell: Callable[[], bytes],
    *,
    finish_by_s: float = math.inf,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """End `streams` in their order, spread evenly over `window_s` seconds, all of them by
    `finish_by_s`.

    A worker too busy to keep the schedule (its loop late) catches up at no more than
    CATCH_UP times the planned rate, never by ending every overdue stream in one go: that
    burst is what pacing is there to prevent. The tail may slide past the window, up to
    `finish_by_s`, when whatever is left is ended at once.
    """
    count = len(streams)
    schedule = drain_schedule(count, window_s)
    rate = count / window_s if window_s > 0 else math.inf
    started = last = clock()
    done = 0
    allowance = burst = max(1.0, rate * BURST_S)
    while done < count:
        now = clock()
        allowance = min(allowance + (now - last) * rate * CATCH_UP, burst)
        last = now
        if now - started >= finish_by_s:
            allowance = math.inf
        while done < count and schedule[done] <= now - started and allowance >= 1:
            streams[done].drain(farewell())
            done += 1
            allowance -= 1
        if done < count:
            await sleep(min(TICK_S, max(0.0, schedule[done] - (clock() - started))))
