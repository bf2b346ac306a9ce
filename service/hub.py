"""The worker's one shared Redis subscription, fanned out to bounded per-listener inboxes.

Every SSE connection of this process listens through the hub: the first listener of a channel
subscribes it, the last one unsubscribes it, and a single reader task hands each message to
all local listeners without ever waiting on one of them. A listener whose inbox is full is
ended (and counted) rather than allowed to hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .envelope import Delivery, decode_payload
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0
RECONNECT_BASE_S = 0.05
RECONNECT_CAP_S = 2.0


class EndReason(Enum):
    """Why the hub ended a listener."""

    SLOW = "slow"
    SHUTDOWN = "shutdown"
    HUB_FAILED = "hub_failed"


class Resync(Enum):
    """Inbox marker: the shared subscription was re-established; messages may have been missed."""

    AFTER_RECONNECT = "after_reconnect"


class Incoming:
    """One message from Redis, shared by every listener of its channel; decoded once, lazily."""

    __slots__ = ("_delivery", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._delivery: Delivery | None = None

    @property
    def delivery(self) -> Delivery:
        """The decoded event; raises ValueError if the payload is malformed."""
        if self._delivery is None:
            self._delivery = decode_payload(self.payload)
        return self._delivery


InboxItem = Incoming | Resync


class Listener:
    """A bounded inbox for one local consumer of a channel."""

    __slots__ = ("_items", "_limit", "_waiter", "ended")

    def __init__(self, limit: int) -> None:
        self._items: deque[InboxItem] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self.ended: EndReason | None = None

    def offer(self, item: InboxItem) -> bool:
        """Queue `item` without waiting; False (and the listener ends) if the inbox is full."""
        if self.ended is not None:
            return True
        if len(self._items) >= self._limit:
            self.end(EndReason.SLOW)
            return False
        self._items.append(item)
        self._wake()
        return True

    def end(self, reason: EndReason) -> None:
        """Stop this listener; its consumer sees `ended` once the inbox is drained."""
        if self.ended is None:
            self.ended = reason
        self._wake()

    async def take(self, timeout_s: float) -> list[InboxItem]:
        """Everything queued, waiting up to `timeout_s` for the first item; [] on timeout or end."""
        if not self._items and self.ended is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await waiter
            except TimeoutError:
                pass
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass(slots=True)
class _Channel:
    listeners: set[Listener] = field(default_factory=set)
    ready: asyncio.Future[None] | None = None


@dataclass(slots=True)
class HubStats:
    """Counters exposed as metrics."""

    slow_listeners_dropped: int = 0
    reconnects: int = 0
    messages_received: int = 0


class HubClosedError(RuntimeError):
    """The hub is shutting down or its reader failed; the caller should end its stream."""


class Hub:
    """One pub/sub connection per worker, multiplexed over any number of local listeners."""

    def __init__(
        self, redis: Redis, control_channel: str, inbox_limit: int, timeout_s: float = 2.0
    ) -> None:
        self._pubsub: Any = redis.pubsub()
        self._control_channel = control_channel.encode()
        self._inbox_limit = inbox_limit
        # Silence longer than this gets a PING; twice this without any answer means the
        # connection is dead even if TCP has not noticed (a partition, a frozen server).
        self._idle_s = timeout_s
        self._channels: dict[bytes, _Channel] = {}
        # Futures for SUBSCRIBE commands sent but not yet confirmed, per channel, in send order:
        # Redis confirms in order, so each confirmation completes the oldest one.
        self._pending_acks: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._resync_pending = False
        self._closing = False
        self.connected = False
        self.stats = HubStats()

    async def start(self) -> None:
        """Subscribe the control channel (so the connection always has a subscription) and read."""
        ack = self._expect_ack(self._control_channel)
        await self._pubsub.subscribe(self._control_channel)
        # redis-py re-subscribes every channel on reconnect; this hook tells us it happened.
        self._pubsub.connection.register_connect_callback(self._on_reconnect)
        self._reader = asyncio.create_task(self._read_forever(), name="hub-reader")
        await asyncio.wait_for(asyncio.shield(ack), SUBSCRIBE_TIMEOUT_S)
        self.connected = True

    async def close(self) -> None:
        """End every listener, stop the reader and release the connection."""
        self._closing = True
        self._end_all(EndReason.SHUTDOWN)
        await cancel_and_wait([self._reader])
        self._reader = None
        await self._pubsub.aclose()
        self.connected = False

    def end_listeners(self, reason: EndReason) -> None:
        """End every local listener now (graceful drain), keeping the subscription alive."""
        self._end_all(reason)

    @property
    def channel_count(self) -> int:
        """Channels this worker is subscribed to for listeners (excluding the control channel)."""
        return len(self._channels)

    @property
    def listener_count(self) -> int:
        """Local listeners across all channels."""
        return sum(len(c.listeners) for c in self._channels.values())

    def listeners_of(self, channel: str) -> int:
        """Local listeners of one channel."""
        state = self._channels.get(channel.encode())
        return len(state.listeners) if state else 0

    @contextlib.asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[Listener]:
        """A listener on `channel` whose subscription is live when the block starts."""
        if self._closing or self._reader is None or self._reader.done():
            raise HubClosedError("hub is not running")
        name = channel.encode()
        listener = Listener(self._inbox_limit)
        state = self._channels.get(name)
        if state is None:
            state = self._channels[name] = _Channel()
            state.ready = self._expect_ack(name)
            state.listeners.add(listener)
            try:
                await self._pubsub.subscribe(name)
            except BaseException:
                await self._leave(name, state, listener)
                raise
        else:
            state.listeners.add(listener)
        try:
            if state.ready is not None and not state.ready.done():
                await asyncio.wait_for(asyncio.shield(state.ready), SUBSCRIBE_TIMEOUT_S)
            yield listener
        finally:
            await self._leave(name, state, listener)

    async def _leave(self, name: bytes, state: _Channel, listener: Listener) -> None:
        state.listeners.discard(listener)
        if state.listeners or self._channels.get(name) is not state:
            return
        del self._channels[name]
        if self._closing:
            return
        try:
            await self._pubsub.unsubscribe(name)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            # The reconnect path re-subscribes only channels still in use, so nothing leaks.
            log.debug("unsubscribe %r failed: %s", name, error)

    def _expect_ack(self, name: bytes) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._pending_acks.setdefault(name, deque()).append(future)
        return future

    def _on_subscribed(self, name: bytes) -> None:
        waiting = self._pending_acks.get(name)
        if waiting:
            future = waiting.popleft()
            if not waiting:
                del self._pending_acks[name]
            if not future.done():
                future.set_result(None)

    def _dispatch(self, name: bytes, payload: bytes) -> None:
        state = self._channels.get(name)
        if state is None:
            return
        self.stats.messages_received += 1
        incoming = Incoming(payload)
        for listener in state.listeners:
            if not listener.offer(incoming):
                self.stats.slow_listeners_dropped += 1
                log.warning("dropped a slow listener on %s (inbox full)", name.decode())

    async def _read_forever(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    message = await self._next_message()
                except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                    failures += 1
                    self.connected = False
                    delay_s = _backoff_s(failures)
                    log.warning(
                        "shared subscription lost (%s); reconnecting in %.2fs", error, delay_s
                    )
                    await asyncio.sleep(delay_s)
                    continue
                failures = 0
                if self._handle(message):
                    await self._drop_stale_subscriptions()
        except Exception:
            # A bug, not a Redis outage: end every stream so clients reconnect to a healthy
            # worker, and let readiness report the failure instead of hanging silently.
            log.exception("hub reader failed; ending all listeners")
            self.connected = False
            self._end_all(EndReason.HUB_FAILED)

    async def _next_message(self) -> dict[str, Any]:
        """The next message; pings a silent connection and gives up on one that stays silent."""
        pinged = False
        while True:
            message = await self._pubsub.get_message(timeout=self._idle_s)
            if message is not None:
                return message  # type: ignore[no-any-return]
            if pinged:
                await self._pubsub.connection.disconnect()
                raise RedisConnectionError(f"no answer to PING within {self._idle_s}s")
            await self._pubsub.ping()
            pinged = True

    def _handle(self, message: dict[str, Any]) -> bool:
        """Act on one message; True right after the subscription was re-established."""
        kind = message["type"]
        if kind in ("message", b"message"):
            self._dispatch(message["channel"], message["data"])
        elif kind in ("subscribe", b"subscribe"):
            self._on_subscribed(message["channel"])
            if self._resync_pending:
                # The first confirmation of the re-subscribe command: all channels are live again.
                self._resync_pending = False
                self.connected = True
                log.info(
                    "shared subscription re-established; %d channels resubscribed",
                    len(self._channels),
                )
                self._resync_all()
                return True
        return False

    async def _drop_stale_subscriptions(self) -> None:
        """Unsubscribe channels redis-py re-subscribed whose last listener left meanwhile."""
        wanted = {*self._channels, self._control_channel}
        stale = [name for name in self._pubsub.channels if name not in wanted]
        if stale:
            await self._pubsub.unsubscribe(*stale)

    def _on_reconnect(self, connection: object) -> None:
        del connection
        self.stats.reconnects += 1
        self._resync_pending = True

    def _resync_all(self) -> None:
        for state in self._channels.values():
            for listener in state.listeners:
                listener.offer(Resync.AFTER_RECONNECT)

    def _end_all(self, reason: EndReason) -> None:
        for state in self._channels.values():
            for listener in state.listeners:
                listener.end(reason)
        for waiting in self._pending_acks.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(HubClosedError(reason.value))
        self._pending_acks.clear()


def _backoff_s(failures: int) -> float:
    """Capped exponential backoff with full jitter."""
    return random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**failures))
