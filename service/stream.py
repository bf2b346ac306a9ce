"""One SSE connection: headers, replay from the log, live events, heartbeats, and its end.

The connection's subscription is live before its session is attached and its log is read
(the first page with the attach, in the same script), so the seam between replay and live
delivery has neither gap nor duplicate: live events are dropped when their id is not newer
than the last one written.

Every write the stream's task makes is bounded in time (`write_timeout_s`): a client that
stops reading is dropped as slow, also in the middle of a replay, which goes out in pages
of about `REPLAY_PAGE_BYTES` so that a long log never sits whole in the worker's memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from redis.exceptions import RedisError

from . import sse
from .chunked import ChunkWriter
from .envelope import GAP_EVENT, UNAUTHORIZED_EVENT, Delivery, parse_event_id
from .mailbox import Incoming, Listener, Resync, StreamEnd
from .sessions import SessionStore

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    # A session's events are that client's: no cache may keep them (no-cache would allow it).
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


# A client whose socket holds more unsent bytes than this gets no more direct writes; its
# events queue in its inbox, which is bounded, so a client that stays behind is dropped.
DIRECT_WRITE_BUFFER_LIMIT = 64 * 1024
# Replay reads the log in pages of about this many bytes (the first page, whose event sizes
# are not known yet, holds REPLAY_FIRST_PAGE events), and writes them in pieces of at most
# WRITE_PIECE_BYTES, each of which must drain within the write deadline.
REPLAY_PAGE_BYTES = 256 * 1024
REPLAY_FIRST_PAGE = 16
REPLAY_PAGE_MAX = 500
WRITE_PIECE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What one connection will do, decided before its response starts."""

    session_id: str
    replay_after: str
    detect_gap: bool
    ttl_ms: int
    retry_ms: int
    heartbeat_interval_s: float
    write_timeout_s: float
    # When the subscriber's token runs out (a time.monotonic() value); None: never.
    access_ends_at: float | None = None


class SlowClientError(Exception):
    """A write did not drain within the deadline: the client has stopped reading."""


# The stream's last frame when its subscriber's token expires (subscribe_auth.py).
UNAUTHORIZED_FRAME = sse.Event(
    data="the access token has expired", event=UNAUTHORIZED_EVENT
).encode()


class EventStream:
    """Writes one session's events to one client until the stream has a reason to end.

    The stream's task does the replay, heartbeats, resyncs and the end. While it is parked
    waiting for its inbox, the hub's reader hands it each live event (`_write_live`), and a
    plain event the socket can take goes out pre-framed, with no task switch, at the end of
    the batch it came in. Anything else (a finish, a resync marker, a slow or closing
    socket) goes through the inbox to the task, which writes through aiohttp and waits for
    the socket to drain, never longer than the write deadline.
    """

    # One per open stream: slots, not a per-instance dict.
    __slots__ = (
        "_connection", "_end", "_expires_at", "_farewell", "_first_page", "_last_id",
        "_last_position", "_listener", "_live", "_needs_resync", "_plan", "_relaying_since",
        "_response", "_sessions", "events_replayed", "events_sent",
    )  # fmt: skip

    def __init__(
        self,
        response: web.StreamResponse,
        listener: Listener,
        sessions: SessionStore,
        plan: StreamPlan,
        transport: asyncio.WriteTransport | None = None,
        *,
        direct_writes: bool = True,
        first_page: Sequence[Delivery] | None = None,
    ) -> None:
        """`transport`: the client's socket; `direct_writes` only for a chunked response.

        `first_page`: the log's first REPLAY_FIRST_PAGE events from `plan.replay_after` on,
        that id included, as read with the attach; None: the stream reads them itself.
        """
        self._response = response
        self._connection = transport
        self._live = (
            ChunkWriter(transport, DIRECT_WRITE_BUFFER_LIMIT)
            if transport is not None and direct_writes
            else None
        )
        self._listener = listener
        self._sessions = sessions
        self._plan = plan
        self._last_id = plan.replay_after
        self._first_page = first_page
        self._last_position = parse_event_id(plan.replay_after)
        self._needs_resync = False
        self._end: StreamEnd | None = None  # why the stream ends, once it knows
        self._expires_at = time.monotonic() + plan.ttl_ms / 1000
        self.events_sent = 0
        self.events_replayed = 0
        # When the oldest event of the batch being written arrived; None between batches.
        self._relaying_since: float | None = None
        # The last frame when the worker drains (set by `drain`).
        self._farewell: bytes | None = None

    async def run(self) -> StreamEnd:
        """Replay what the client missed, then relay live events; return why it ended."""
        self._listener.on_end = self._on_listener_end
        try:
            end = await self._run()
            if end is StreamEnd.SHUTDOWN and self._farewell is not None:
                await self._write(self._farewell)
            return end
        except SlowClientError:
            log.info(
                "session %s: a write did not drain within %gs; dropping the client as slow",
                self._plan.session_id,
                self._plan.write_timeout_s,
            )
            if self._connection is not None:
                self._connection.abort()
            return StreamEnd.SLOW

    @property
    def session_id(self) -> str:
        """The session whose events this stream writes."""
        return self._plan.session_id

    def drain(self, farewell: bytes) -> None:
        """End the stream for shutdown after what it holds; `farewell` is its last frame."""
        self._farewell = farewell
        self._listener.end(StreamEnd.SHUTDOWN)

    @property
    def buffered_bytes(self) -> int:
        """Bytes written for this client that its socket has not sent yet (leak metrics)."""
        transport = self._connection
        if transport is None or transport.is_closing():
            return 0
        return transport.get_write_buffer_size()

    @property
    def unsent_since(self) -> float | None:
        """When the oldest event not yet written arrived (in the inbox or being written)."""
        since = self._relaying_since
        waiting = self._listener.waiting_since
        if since is None or (waiting is not None and waiting < since):
            return waiting
        return since

    @property
    def dropped_as_slow(self) -> bool:
        """The hub dropped this stream's client as too slow (its connection was cut)."""
        return self._listener.ended is StreamEnd.SLOW

    def _on_listener_end(self, reason: StreamEnd) -> None:
        if reason is StreamEnd.SLOW and self._connection is not None:
            # The client stopped reading. The task may be waiting for the socket to drain,
            # which would hold the connection, its slot and its listener for as long as the
            # client keeps it open; the client reconnects and resumes from its last id.
            self._connection.abort()

    async def _run(self) -> StreamEnd:
        plan = self._plan
        await self._write(sse.retry(plan.retry_ms) + sse.comment("connected"))
        await self._replay(plan.replay_after, plan.detect_gap, self._take_first_page())
        listener, live = self._listener, self._live
        direct = self._write_live if live is not None else None
        access_ends_at = plan.access_ends_at if plan.access_ends_at is not None else math.inf
        connection = self._connection
        while self._end is None:
            if connection is not None and connection.is_closing():
                # The client is gone. Its handler's cancellation should have said so, but
                # TODO(PY312): on 3.11 asyncio.wait_for, which redis-py sends commands
                # under, can swallow a cancellation (CPython gh-86296); without this check
                # such a stream would wait for its next heartbeat to notice.
                return StreamEnd.CLIENT_GONE
            wait_s = min(
                plan.heartbeat_interval_s,
                self._expires_at - time.monotonic(),
                access_ends_at - time.monotonic(),
            )
            listener.direct = direct
            try:
                items = await listener.take(max(0.0, wait_s))
            finally:
                listener.direct = None
            if live is not None:
                live.flush()  # older than anything the task writes next
            if time.monotonic() >= access_ends_at:
                # Checked before anything is relayed, so a busy stream ends on time too.
                await self._write(UNAUTHORIZED_FRAME)
                return StreamEnd.UNAUTHORIZED
            if items:
                self._relaying_since = listener.taken_since
                await self._relay(items)
                self._relaying_since = None
            elif self._listener.ended is not None:
                return self._listener.ended
            elif time.monotonic() >= self._expires_at:
                if await self._expired():
                    return StreamEnd.EXPIRED
            elif self._needs_resync:
                await self._resync()
            else:
                await self._write(sse.PING)
        return self._end

    def _take_first_page(self) -> Sequence[Delivery] | None:
        """The page read with the attach, handed over once: kept, it could hold megabytes
        for as long as the stream lives."""
        page, self._first_page = self._first_page, None
        return page

    def _write_live(self, item: Incoming | Resync) -> bool:
        """Take a plain live event for the socket; False leaves `item` to the task."""
        live = self._live
        if (
            type(item) is not Incoming
            or self._needs_resync  # live events must wait until the log fills the hole
            or live is None
            or not live.has_room()
        ):
            return False
        try:
            delivery = item.delivery
        except ValueError:
            return False  # the task logs and drops it
        if delivery.is_finish:
            return False  # the task writes it and ends the stream
        if self._accept(delivery):
            live.add(item.chunk)
        return True

    async def _relay(self, items: list[Incoming | Resync]) -> None:
        """Write the new events among `items` in one write, stopping after `finish`."""
        frames: list[bytes] = []
        for item in items:
            if isinstance(item, Resync):
                self._needs_resync = True
                continue
            if self._needs_resync:
                # Live events newer than a hole must wait until the log has filled it. If the
                # log cannot be read yet, drop them: the next successful resync replays them.
                await self._flush(frames)
                frames = []
                if not await self._resync() or self._end is not None:
                    return
            try:
                delivery = item.delivery
            except ValueError:
                log.error("dropping a malformed message on session %s", self._plan.session_id)
                continue
            if self._accept(delivery):
                frames.append(delivery.frame)
                if delivery.is_finish:
                    self._end = StreamEnd.FINISHED
                    break
        await self._flush(frames)
        if self._needs_resync and self._end is None:
            await self._resync()

    async def _resync(self) -> bool:
        """Replay from the last event written, after the shared subscription came back.

        Returns False while Redis cannot be read; the stream stays open (heartbeats go on)
        and tries again on its next event or heartbeat.
        """
        try:
            await self._replay(self._last_id, detect_gap=self._last_id != "0-0")
        except RedisError as error:
            log.info(
                "session %s: resync postponed, redis unavailable: %s", self._plan.session_id, error
            )
            return False
        self._needs_resync = False
        return True

    async def _expired(self) -> bool:
        """Whether the session's TTL ran out; if not, when to look again."""
        try:
            ttl_ms = await self._sessions.ttl_ms(self._plan.session_id)
        except RedisError as error:
            log.info(
                "session %s: TTL check postponed, redis unavailable: %s",
                self._plan.session_id,
                error,
            )
            ttl_ms = round(self._plan.heartbeat_interval_s * 1000)
        if ttl_ms <= 0:
            return True
        self._expires_at = time.monotonic() + ttl_ms / 1000
        return False

    async def _must_stop(self) -> bool:
        """Between replay pages: whether the hub ended the listener or the session expired."""
        if self._listener.ended is not None:
            self._end = self._listener.ended
        elif time.monotonic() >= self._expires_at and await self._expired():
            self._end = StreamEnd.EXPIRED
        return self._end is not None

    async def _replay(
        self, after: str, detect_gap: bool, first_page: Sequence[Delivery] | None = None
    ) -> None:
        """Write logged events after `after`, stopping after `finish`.

        A hole in the history is announced with `gap` (data: the last id the client had).
        If the session itself is gone (expired, deleted, lost with Redis' data), nothing
        will ever follow: the stream ends right after the `gap`, and the client's resume
        is answered 204. `first_page`, when given, is the first page already read.
        """
        session_id = self._plan.session_id
        count = REPLAY_FIRST_PAGE
        # The first page starts at `after` itself: if it is not there, the history has a hole.
        if first_page is None:
            page = await self._sessions.read_page(session_id, after, count)
        else:
            page = list(first_page)
        more = len(page) == count
        frames = []
        if page and page[0].id == after:
            page = page[1:]
        elif detect_gap:
            frames.append(sse.Event(data=after, event=GAP_EVENT).encode())
            if not page and not await self._sessions.exists(session_id):
                log.info("session %s is gone: its stream ends after a gap", session_id)
                self._end = StreamEnd.SESSION_GONE
        while True:
            for delivery in page:
                if self._accept(delivery):
                    self.events_replayed += 1
                    frames.append(delivery.frame)
                    if delivery.is_finish:
                        self._end = StreamEnd.FINISHED
                        break
            await self._flush(frames)
            if self._end is not None or not more or not page or await self._must_stop():
                return
            frames = []
            count = _page_count(page)
            page = await self._sessions.read_page(session_id, "(" + page[-1].id, count)
            more = len(page) == count

    def _accept(self, delivery: Delivery) -> bool:
        if delivery.position <= self._last_position:
            return False
        self._last_position = delivery.position
        self._last_id = delivery.id
        self.events_sent += 1
        return True

    async def _flush(self, frames: list[bytes]) -> None:
        """Write `frames` in pieces of at most WRITE_PIECE_BYTES (a larger frame alone)."""
        piece: list[bytes] = []
        size = 0
        for frame in frames:
            if piece and size + len(frame) > WRITE_PIECE_BYTES:
                await self._write(b"".join(piece))
                piece, size = [], 0
            piece.append(frame)
            size += len(frame)
        if piece:
            await self._write(piece[0] if len(piece) == 1 else b"".join(piece))

    async def _write(self, data: bytes) -> None:
        """Write through aiohttp, waiting for the socket to drain no longer than the deadline."""
        try:
            async with asyncio.timeout(self._plan.write_timeout_s):
                await self._response.write(data)
        except TimeoutError:
            raise SlowClientError from None


def _page_count(page: list[Delivery]) -> int:
    """How many events the next page may hold to stay near REPLAY_PAGE_BYTES."""
    average = sum(len(delivery.frame) for delivery in page) / len(page)
    return max(1, min(REPLAY_PAGE_MAX, int(REPLAY_PAGE_BYTES / average)))
