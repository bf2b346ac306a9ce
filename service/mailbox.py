"""A stream's mailbox: the bounded inbox the hub fills and one stream empties, and its items.

The hub hands every message of a channel to each listener's inbox without waiting; the
stream that owns the listener takes them out. An item is framed (decoded, encoded as SSE,
wrapped as an HTTP chunk) at most once however many inboxes it is in. Why a stream ended,
whether the hub ended its listener or the stream itself stopped, is one `StreamEnd`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import Enum

from .chunked import http_chunk
from .envelope import Delivery, decode_payload


class StreamEnd(Enum):
    """Why a stream ended, as logged and counted."""

    FINISHED = "finished"
    EXPIRED = "expired"
    CLIENT_GONE = "client_gone"
    SLOW = "slow"
    SHUTDOWN = "shutdown"
    HUB_FAILED = "hub_failed"
    SESSION_GONE = "session_gone"  # its history and the session itself were lost: after `gap`
    UNAUTHORIZED = "unauthorized"


# The reasons for which the hub ends a listener; the others are the stream's own.
HUB_ENDS = (StreamEnd.SLOW, StreamEnd.SHUTDOWN, StreamEnd.HUB_FAILED)


class Resync(Enum):
    """Inbox marker: the shared subscription was re-established; messages may have been missed."""

    AFTER_RECONNECT = "after_reconnect"


class Incoming:
    """One message from Redis, shared by every listener of its channel.

    It is decoded, and framed as an HTTP chunk, at most once however many streams write it.
    """

    __slots__ = ("_chunk", "_delivery", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._delivery: Delivery | None = None
        self._chunk: bytes | None = None

    @property
    def delivery(self) -> Delivery:
        """The decoded event; raises ValueError if the payload is malformed."""
        if self._delivery is None:
            self._delivery = decode_payload(self.payload)
        return self._delivery

    @property
    def chunk(self) -> bytes:
        """The event's SSE frame as one chunk of a chunked HTTP/1.1 body."""
        if self._chunk is None:
            self._chunk = http_chunk(self.delivery.frame)
        return self._chunk


InboxItem = Incoming | Resync
DirectHandler = Callable[[InboxItem], bool]


class Listener:
    """A bounded inbox for one local consumer of a channel.

    While its consumer is idle it may install a `direct` handler, which gets each item first
    and handles the common case on the spot (a stream writes a live event straight to its
    socket), saving a task switch per event. Whatever the handler declines, and everything
    that arrives while the inbox is not empty, is queued, so items are never reordered.

    A `coalescing` listener is for wake-ups, whose content does not matter: a full inbox
    drops further items but still wakes the consumer, and is never a reason to end it.
    """

    __slots__ = (
        "_coalescing", "_items", "_limit", "_waiter", "direct", "ended", "on_end",
        "taken_since", "waiting_since",
    )  # fmt: skip

    def __init__(self, limit: int, *, coalescing: bool = False) -> None:
        # A list swapped out whole by `take`: one append per offer, no copy per take.
        self._items: list[InboxItem] = []
        self._limit = limit
        self._coalescing = coalescing
        self._waiter: asyncio.Future[None] | None = None
        self.direct: DirectHandler | None = None
        self.ended: StreamEnd | None = None
        # Told once, synchronously, when the listener ends (its consumer may be blocked).
        self.on_end: Callable[[StreamEnd], None] | None = None
        # When the oldest item still queued arrived (time.monotonic()); None while empty, and
        # when the oldest item of the last batch taken arrived. Read by the leak metrics only:
        # one clock read when the inbox stops being empty, none per item.
        self.waiting_since: float | None = None
        self.taken_since: float | None = None

    def offer(self, item: InboxItem) -> bool:
        """Hand `item` over without waiting; False (and the listener ends) if the inbox is full."""
        if self.ended is not None:
            return True
        if self.direct is not None and not self._items and self.direct(item):
            return True
        if len(self._items) >= self._limit:
            if self._coalescing:  # the consumer has a wake-up queued already: enough
                self._wake()
                return True
            self.end(StreamEnd.SLOW)
            return False
        if not self._items:
            self.waiting_since = time.monotonic()
        self._items.append(item)
        self._wake()
        return True

    def end(self, reason: StreamEnd) -> None:
        """Stop this listener; its consumer sees `ended` once the inbox is drained."""
        if self.ended is None:
            self.ended = reason
            if self.on_end is not None:
                self.on_end(reason)
        self._wake()

    async def take(self, timeout_s: float) -> list[InboxItem]:
        """Everything queued, waiting up to `timeout_s` for the first item; [] on timeout or end."""
        if not self._items and self.ended is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A bare timer, not asyncio.timeout(): this runs once per delivery on every
            # stream, and the context manager's bookkeeping showed up in worker profiles.
            timer = loop.call_later(timeout_s, _release, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        items = self._items
        self._items = []
        self.taken_since, self.waiting_since = self.waiting_since, None
        return items

    def _wake(self) -> None:
        if self._waiter is not None:
            _release(self._waiter)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
