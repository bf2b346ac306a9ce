"""A parked stream writes plain live events straight to its socket; everything else waits.

These drive EventStream with stand-ins for the response, the socket and the session store,
so every write is seen in the order the client would receive it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.chunked import http_chunk
from service.envelope import Delivery
from service.mailbox import HUB_ENDS, Incoming, Listener, Resync, StreamEnd
from service.stream import (
    DIRECT_WRITE_BUFFER_LIMIT,
    REPLAY_FIRST_PAGE,
    REPLAY_PAGE_BYTES,
    WRITE_PIECE_BYTES,
    EventStream,
    StreamPlan,
)

from sse_reader import SSEParser
from waiting import wait_for


def chunks_of(data: bytes) -> list[bytes]:
    """The chunks one direct write holds: whole chunks only, never the last (empty) one."""
    chunks = []
    while data:
        size_text, _, rest = data.partition(b"\r\n")
        size = int(size_text, 16)
        assert size > 0
        assert rest[size : size + 2] == b"\r\n"
        chunks.append(rest[:size])
        data = rest[size + 2 :]
    return chunks


class Wire:
    """What reached the client, in order: ('task', bytes) via aiohttp, ('direct', chunks)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []

    def body(self) -> bytes:
        """The SSE bytes the client decodes, each direct write checked to be whole chunks."""
        parts = []
        for path, data in self.writes:
            parts.extend(chunks_of(data) if path == "direct" else [data])
        return b"".join(parts)

    def direct_writes(self) -> list[list[bytes]]:
        return [chunks_of(data) for path, data in self.writes if path == "direct"]

    def ids(self) -> list[str]:
        return [event.id for event in SSEParser().feed(self.body().decode())]


class FakeResponse:
    def __init__(self, wire: Wire) -> None:
        self._wire = wire

    async def write(self, data: bytes) -> None:
        self._wire.writes.append(("task", data))


class StalledResponse(FakeResponse):
    """A client that reads the first write and then nothing more: the next never drains."""

    def __init__(self, wire: Wire) -> None:
        super().__init__(wire)
        self.stalled = asyncio.Event()

    async def write(self, data: bytes) -> None:
        if self._wire.writes:
            self.stalled.set()
            await asyncio.Event().wait()
        await super().write(data)


class FakeTransport:
    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self.closing = False
        self.aborted = False
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self._wire.writes.append(("direct", data))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True
        self.closing = True


class FakeSessions:
    """A session log that can be made unreadable, as during a Redis outage."""

    def __init__(self) -> None:
        self.log: list[Delivery] = []
        self.down = False
        self.failed_reads = 0
        self.pages: list[int] = []  # the size of each page read, in events
        self.ttl = 60_000

    async def read_page(self, session_id: str, start: str, count: int) -> list[Delivery]:
        del session_id
        if self.down:
            self.failed_reads += 1
            raise RedisConnectionError("redis is down")
        excluded = start.startswith("(")
        position = tuple(int(part) for part in start.lstrip("(").split("-"))
        page = [
            d
            for d in self.log
            if d.position > position or (d.position == position and not excluded)
        ][:count]
        self.pages.append(len(page))
        return page

    async def exists(self, session_id: str) -> bool:
        del session_id
        return True

    async def ttl_ms(self, session_id: str) -> int:
        del session_id
        return self.ttl


def event(n: int, name: str = "") -> Delivery:
    return Delivery(f"{n}-0", name, f"m{n}")


def incoming(delivery: Delivery) -> Incoming:
    return Incoming(f"{delivery.id}\n{delivery.event}\n{delivery.data}".encode())


def plan(heartbeat_s: float = 5.0, ttl_ms: int = 60_000) -> StreamPlan:
    return StreamPlan(
        session_id="s",
        replay_after="0-0",
        detect_gap=False,
        ttl_ms=ttl_ms,
        retry_ms=500,
        heartbeat_interval_s=heartbeat_s,
        write_timeout_s=0.2,
    )


class Setup:
    def __init__(
        self,
        direct: bool,
        heartbeat_s: float = 5.0,
        ttl_ms: int = 60_000,
        stalled: bool = False,
        *,
        stream_plan: StreamPlan | None = None,
        first_page: list[Delivery] | None = None,
    ) -> None:
        self.wire = Wire()
        self.transport = FakeTransport(self.wire)
        self.listener = Listener(limit=100)
        self.sessions = FakeSessions()
        self.response = StalledResponse(self.wire) if stalled else FakeResponse(self.wire)
        self.stream = EventStream(
            self.response,  # type: ignore[arg-type]
            self.listener,
            self.sessions,  # type: ignore[arg-type]
            stream_plan or plan(heartbeat_s, ttl_ms),
            self.transport if direct else None,  # type: ignore[arg-type]
            first_page=first_page,
        )

    async def parked(self) -> bool:
        return self.listener._waiter is not None


@pytest.fixture
def setup() -> Setup:
    return Setup(direct=True)


# _write_live on its own: what it takes, what it leaves to the task.


async def next_iteration() -> None:
    """Let the loop run what was scheduled (the write after a batch of messages)."""
    await asyncio.sleep(0)


async def test_a_plain_live_event_is_written_as_one_chunk_after_the_batch(setup: Setup) -> None:
    delivery = event(1)
    assert setup.stream._write_live(incoming(delivery))
    assert setup.stream.events_sent == 1
    await next_iteration()
    assert setup.wire.writes == [("direct", http_chunk(delivery.frame))]


async def test_events_taken_in_one_batch_go_out_in_one_write(setup: Setup) -> None:
    deliveries = [event(n) for n in range(1, 6)]
    for delivery in deliveries:
        assert setup.stream._write_live(incoming(delivery))
    await next_iteration()
    assert setup.wire.direct_writes() == [[d.frame for d in deliveries]]
    assert setup.stream._write_live(incoming(event(6)))
    await next_iteration()
    assert setup.wire.direct_writes()[1:] == [[event(6).frame]]


@pytest.mark.parametrize(
    "item",
    [
        Resync.AFTER_RECONNECT,
        incoming(event(1, "finish")),
        Incoming(b"bad-id\n\nx"),
        Incoming(b"no newline"),
    ],
    ids=["resync", "finish", "malformed id", "malformed payload"],
)
async def test_markers_finish_and_malformed_payloads_are_left_to_the_task(
    setup: Setup, item: Incoming | Resync
) -> None:
    assert not setup.stream._write_live(item)
    await next_iteration()
    assert setup.wire.writes == []
    assert setup.stream.events_sent == 0


async def test_a_closing_socket_gets_no_direct_write(setup: Setup) -> None:
    setup.transport.closing = True
    assert not setup.stream._write_live(incoming(event(1)))
    setup.transport.closing = False
    assert setup.stream._write_live(incoming(event(2)))
    setup.transport.closing = True  # the client went away before the batch was written
    await next_iteration()
    assert setup.wire.writes == []


async def test_chunks_waiting_for_the_batch_end_count_towards_the_limit(setup: Setup) -> None:
    first = event(1)
    setup.transport.buffered = DIRECT_WRITE_BUFFER_LIMIT - len(http_chunk(first.frame)) + 1
    assert setup.stream._write_live(incoming(first))  # the socket alone is under the limit
    assert not setup.stream._write_live(incoming(event(2)))  # with the waiting chunk, over
    await next_iteration()
    assert setup.wire.ids() == ["1-0"]


async def test_a_socket_holding_more_than_the_limit_gets_no_direct_write(setup: Setup) -> None:
    setup.transport.buffered = DIRECT_WRITE_BUFFER_LIMIT
    assert setup.stream._write_live(incoming(event(1)))
    setup.transport.buffered = DIRECT_WRITE_BUFFER_LIMIT + 1
    assert not setup.stream._write_live(incoming(event(2)))
    await next_iteration()
    assert setup.wire.ids() == ["1-0"]


async def test_an_event_not_newer_than_the_last_is_consumed_unwritten(setup: Setup) -> None:
    assert setup.stream._write_live(incoming(event(2)))
    assert setup.stream._write_live(incoming(event(2)))
    assert setup.stream._write_live(incoming(event(1)))
    await next_iteration()
    assert setup.wire.ids() == ["2-0"]
    assert setup.stream.events_sent == 1


def test_without_a_socket_nothing_is_written_directly() -> None:
    stream = Setup(direct=False).stream
    assert not stream._write_live(incoming(event(1)))


# The whole stream: direct writes interleaved with the task's, in order.


async def test_live_events_go_direct_and_finish_through_the_task(setup: Setup) -> None:
    setup.sessions.log = [event(1), event(2)]
    running = asyncio.create_task(setup.stream.run())
    await wait_for(setup.parked)
    assert setup.listener.direct is not None
    for n in range(3, 8):
        assert setup.listener.offer(incoming(event(n)))
    assert not setup.listener._items  # all taken directly
    setup.listener.offer(incoming(event(8, "finish")))
    async with asyncio.timeout(2):
        assert await running is StreamEnd.FINISHED
    assert setup.wire.ids() == [f"{n}-0" for n in range(1, 9)]
    # Replay and the finish through aiohttp; the five live events in one direct write.
    paths = [path for path, _ in setup.wire.writes]
    assert paths == ["task", "task", "direct", "task"]
    assert len(setup.wire.direct_writes()[0]) == 5
    assert setup.listener.direct is None  # removed once the stream stopped waiting


async def test_a_full_socket_sends_events_through_the_task_in_order(setup: Setup) -> None:
    running = asyncio.create_task(setup.stream.run())
    await wait_for(setup.parked)
    setup.listener.offer(incoming(event(1)))
    setup.transport.buffered = DIRECT_WRITE_BUFFER_LIMIT + 1
    setup.listener.offer(incoming(event(2)))
    setup.transport.buffered = 0
    setup.listener.offer(incoming(event(3)))  # queued behind 2, not written ahead of it
    setup.listener.offer(incoming(event(4, "finish")))
    async with asyncio.timeout(2):
        assert await running is StreamEnd.FINISHED
    assert setup.wire.ids() == ["1-0", "2-0", "3-0", "4-0"]


@pytest.mark.parametrize(
    "direct",
    [
        pytest.param(False, id="task-only"),
        pytest.param(True, id="direct-writes"),
    ],
)
async def test_live_events_after_a_failed_resync_never_skip_the_hole(direct: bool) -> None:
    # The link came back (a resync marker) while Redis could not be read: events 3 and 4
    # were missed live and are only in the log. Event 5 then arrives live. The client must
    # still get 3 and 4, before 5.
    setup = Setup(direct=direct, heartbeat_s=0.05)
    setup.sessions.log = [event(1), event(2)]
    running = asyncio.create_task(setup.stream.run())
    await wait_for(setup.parked)
    setup.sessions.log += [event(3), event(4)]
    setup.sessions.down = True
    setup.listener.offer(Resync.AFTER_RECONNECT)

    async def resync_failed_and_parked() -> bool:
        return setup.sessions.failed_reads >= 1 and await setup.parked()

    await wait_for(resync_failed_and_parked)
    setup.sessions.log.append(event(5))
    setup.listener.offer(incoming(event(5)))
    failed_before = setup.sessions.failed_reads

    async def failed_again_and_parked() -> bool:
        # The task has seen event 5, or a heartbeat since: a resync failed again meanwhile.
        return setup.sessions.failed_reads > failed_before and await setup.parked()

    await wait_for(failed_again_and_parked)
    setup.sessions.down = False
    finish = event(6, "finish")
    setup.sessions.log.append(finish)

    async def caught_up() -> bool:
        return "5-0" in setup.wire.ids()

    await wait_for(caught_up)
    setup.listener.offer(incoming(finish))
    async with asyncio.timeout(2):
        assert await running is StreamEnd.FINISHED
    assert setup.wire.ids() == ["1-0", "2-0", "3-0", "4-0", "5-0", "6-0"]


# The whole body as framed: only events end with a blank line.


async def test_only_events_end_with_a_blank_line_in_a_whole_stream() -> None:
    # Opening, replay, heartbeats, direct writes and the finish through the task: a client
    # that hands every blank-line-ended block to the application gets each event alone.
    setup = Setup(direct=True, heartbeat_s=0.02)
    setup.sessions.log = [event(1), event(2)]
    running = asyncio.create_task(setup.stream.run())

    async def pinged_while_parked() -> bool:
        return setup.wire.body().endswith(b": ping\n") and await setup.parked()

    await wait_for(pinged_while_parked)
    for n in (3, 4):
        assert setup.listener.offer(incoming(event(n)))

    async def written() -> bool:
        return setup.wire.ids()[-1:] == ["4-0"]

    await wait_for(written)
    await wait_for(pinged_while_parked)  # a heartbeat after the direct writes, too
    setup.listener.offer(incoming(event(5, "finish")))
    async with asyncio.timeout(2):
        assert await running is StreamEnd.FINISHED

    frames = [event(n).frame for n in (1, 2)], [event(n).frame for n in (3, 4)]
    pings = rb"(?:: ping\n)+"
    assert re.fullmatch(
        re.escape(b"retry: 500\n: connected\n" + b"".join(frames[0]))
        + pings
        + re.escape(b"".join(frames[1]))
        + pings
        + re.escape(event(5, "finish").frame),
        setup.wire.body(),
    ), setup.wire.body()
    assert [path for path, _ in setup.wire.writes][:3] == ["task", "task", "task"]
    assert ("direct", b"".join(http_chunk(f) for f in frames[1])) in setup.wire.writes


async def test_a_stream_that_ends_before_any_event_sends_no_blank_line() -> None:
    setup = Setup(direct=True, heartbeat_s=0.02)
    running = asyncio.create_task(setup.stream.run())

    async def pinged() -> bool:
        return setup.wire.body().count(b": ping\n") >= 2

    await wait_for(pinged)
    setup.listener.end(StreamEnd.SHUTDOWN)
    async with asyncio.timeout(2):
        assert await running is StreamEnd.SHUTDOWN
    assert re.fullmatch(rb"retry: 500\n: connected\n(?:: ping\n)+", setup.wire.body())


# Replay: paged reads, bounded writes, and every end rule applied between pages.


def long_log(count: int, size: int) -> list[Delivery]:
    return [Delivery(f"{n}-0", "", f"{n:06d}" + "x" * size) for n in range(1, count + 1)]


async def test_a_long_log_is_read_in_pages_and_written_in_bounded_pieces() -> None:
    setup = Setup(direct=True)
    setup.sessions.log = [*long_log(1999, 1024), event(2000, "finish")]
    async with asyncio.timeout(5):
        assert await setup.stream.run() is StreamEnd.FINISHED
    assert setup.wire.ids() == [f"{n}-0" for n in range(1, 2001)]
    assert setup.stream.events_replayed == 2000
    assert sum(setup.sessions.pages) == 2000
    assert max(setup.sessions.pages) * 1100 <= REPLAY_PAGE_BYTES * 1.1
    assert all(len(data) <= WRITE_PIECE_BYTES for _, data in setup.wire.writes)


async def test_a_stream_starts_from_the_page_read_with_its_attach() -> None:
    log = [event(n) for n in range(1, 4)]
    setup = Setup(direct=True, first_page=log)
    setup.sessions.log = log
    running = asyncio.create_task(setup.stream.run())
    await wait_for(setup.parked)
    # Events published after the attach read the log arrive live; those it read, dropped.
    for n in (3, 4):
        setup.listener.offer(incoming(event(n)))
    setup.listener.offer(incoming(event(5, "finish")))
    async with asyncio.timeout(2):
        assert await running is StreamEnd.FINISHED
    assert setup.wire.ids() == ["1-0", "2-0", "3-0", "4-0", "5-0"]
    assert setup.stream.events_replayed == 3
    assert setup.sessions.pages == []  # the stream read nothing itself


async def test_a_full_first_page_is_followed_by_the_rest_of_the_log() -> None:
    log = [*long_log(39, 100), event(40, "finish")]
    setup = Setup(direct=True, first_page=log[:REPLAY_FIRST_PAGE])
    setup.sessions.log = log
    async with asyncio.timeout(5):
        assert await setup.stream.run() is StreamEnd.FINISHED
    assert setup.wire.ids() == [f"{n}-0" for n in range(1, 41)]
    assert setup.sessions.pages == [40 - REPLAY_FIRST_PAGE]


async def test_a_first_page_that_misses_the_resumed_event_starts_with_a_gap() -> None:
    resumed = dataclasses.replace(plan(), replay_after="5-0", detect_gap=True)
    log = [event(n) for n in range(8, 11)]
    setup = Setup(direct=False, stream_plan=resumed, first_page=log)
    setup.sessions.log = log
    running = asyncio.create_task(setup.stream.run())
    await wait_for(setup.parked)
    setup.listener.end(StreamEnd.SHUTDOWN)
    async with asyncio.timeout(2):
        await running
    events = SSEParser().feed(setup.wire.body().decode())
    assert [(e.event, e.data) for e in events[:1]] == [("gap", "5-0")]
    assert [e.id for e in events[1:]] == ["8-0", "9-0", "10-0"]
    assert setup.sessions.pages == []


async def test_a_write_that_does_not_drain_in_time_ends_the_stream_as_slow() -> None:
    setup = Setup(direct=True, stalled=True)
    setup.sessions.log = long_log(500, 1024)
    async with asyncio.timeout(5):
        assert await setup.stream.run() is StreamEnd.SLOW
    assert isinstance(setup.response, StalledResponse)
    assert setup.response.stalled.is_set()
    assert setup.transport.aborted


async def test_a_session_that_expires_during_a_replay_ends_it_between_pages() -> None:
    setup = Setup(direct=True, ttl_ms=0)
    setup.sessions.log = long_log(2000, 1024)
    setup.sessions.ttl = -2
    async with asyncio.timeout(5):
        assert await setup.stream.run() is StreamEnd.EXPIRED
    assert setup.sessions.pages == [REPLAY_FIRST_PAGE]
    assert len(setup.wire.ids()) == REPLAY_FIRST_PAGE


@pytest.mark.parametrize("reason", list(HUB_ENDS))
async def test_a_listener_ended_by_the_hub_stops_a_replay_between_pages(
    reason: StreamEnd,
) -> None:
    setup = Setup(direct=False)
    setup.sessions.log = long_log(2000, 1024)
    setup.listener.end(reason)
    async with asyncio.timeout(5):
        ended = await setup.stream.run()
    assert ended.value == reason.value
    assert setup.sessions.pages == [REPLAY_FIRST_PAGE]


async def test_a_stream_whose_socket_is_closing_ends_instead_of_waiting(setup: Setup) -> None:
    # Its handler's cancellation can be lost (see EventStream._run); the stream still notices.
    running = asyncio.create_task(setup.stream.run())
    await wait_for(setup.parked)
    setup.transport.closing = True
    setup.listener.offer(incoming(event(1)))  # wakes the task (no direct write to a closing socket)
    async with asyncio.timeout(2):
        assert await running is StreamEnd.CLIENT_GONE


class DeletedAfterFirstPage(FakeSessions):
    """A session deleted during a replay: its log is gone from the second page on."""

    async def read_page(self, session_id: str, start: str, count: int) -> list[Delivery]:
        page = await super().read_page(session_id, start, count)
        self.log = []
        return page


async def test_a_session_deleted_during_a_replay_ends_the_stream_with_its_finish() -> None:
    setup = Setup(direct=False)
    setup.sessions = DeletedAfterFirstPage()
    setup.stream._sessions = setup.sessions  # type: ignore[assignment]
    setup.sessions.log = long_log(2000, 1024)
    setup.listener.offer(incoming(event(5000, "finish")))  # DELETE's last event, live
    async with asyncio.timeout(5):
        assert await setup.stream.run() is StreamEnd.FINISHED
    assert setup.sessions.pages[0] == REPLAY_FIRST_PAGE
    ids = setup.wire.ids()
    assert ids[-1] == "5000-0"
    assert len(ids) < 100  # the rest of the deleted log was never replayed
