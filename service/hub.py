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
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
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
        # A list swapped out whole by `take`: one append per offer, no copy per take.
        self._items: list[InboxItem] = []
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
        return items

    def _wake(self) -> None:
        if self._waiter is not None:
            _release(self._waiter)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(slots=True)
class _Channel:
    listeners: set[Listener] = field(default_factory=set)
    ready: asyncio.Future[None] | None = None


@dataclass(slots=True)
class HubStats:
    """Counters exposed as metrics."""

    slow_listeners_dropped: int = 0
    connects: int = 0
    reconnects: int = 0
    messages_received: int = 0


class HubClosedError(RedisConnectionError):
    """The shared subscription is closing, failed, or reconnecting.

    It is a Redis connection error on purpose: callers answer it like any Redis outage
    (503 with Retry-After), and the client retries, possibly on another worker.
    """


class Hub:
    """One pub/sub connection per worker, multiplexed over any number of local listeners.

    The hub drives its connection itself rather than through redis-py's PubSub object, so
    that reconnecting, re-subscribing and the commands sent by listeners are serialised
    under one lock: a listener leaving during a reconnect can never write to a socket that
    is being replaced.
    """

    def __init__(
        self, redis: Redis, control_channel: str, inbox_limit: int, timeout_s: float = 2.0
    ) -> None:
        self._pool = redis.connection_pool
        self._connection: Connection | None = None
        self._lock = asyncio.Lock()
        self._control_channel = control_channel.encode()
        self._inbox_limit = inbox_limit
        # Silence longer than this gets a PING; as long again without any answer means the
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
        """Connect, subscribe the control channel, and start reading; live when this returns."""
        connection: Connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        self._connection = connection
        ready = self._expect_ack(self._control_channel)
        self._reader = asyncio.create_task(self._read_forever(connection), name="hub-reader")
        await asyncio.wait_for(asyncio.shield(ready), SUBSCRIBE_TIMEOUT_S)

    async def close(self) -> None:
        """End every listener, stop the reader and hand the connection back to the pool."""
        self._closing = True
        self._end_all(EndReason.SHUTDOWN)
        await cancel_and_wait([self._reader])
        self._reader = None
        self.connected = False
        if self._connection is not None:
            async with self._lock:
                await self._connection.disconnect()
            await self._pool.release(self._connection)
            self._connection = None

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
        """A listener on `channel` whose subscription is live when the block starts.

        Raises HubClosedError when the hub is closing, has failed, or has no connection
        to Redis right now (the caller answers 503 and the client retries).
        """
        if self._closing or self._reader is None or self._reader.done():
            raise HubClosedError("the shared subscription is not running")
        name = channel.encode()
        listener = Listener(self._inbox_limit)
        state = self._channels.get(name)
        if state is None:
            if not self.connected:
                raise HubClosedError("the shared subscription is reconnecting to redis")
            state = self._channels[name] = _Channel()
            state.ready = self._expect_ack(name)
            state.listeners.add(listener)
            try:
                await self._send("SUBSCRIBE", name)
            except BaseException:
                await self._leave(name, state, listener)
                raise
        else:
            state.listeners.add(listener)
        try:
            if state.ready is not None and not state.ready.done():
                try:
                    await asyncio.wait_for(asyncio.shield(state.ready), SUBSCRIBE_TIMEOUT_S)
                except TimeoutError:
                    raise HubClosedError("redis did not confirm the subscription") from None
            yield listener
        finally:
            await self._leave(name, state, listener)

    async def _leave(self, name: bytes, state: _Channel, listener: Listener) -> None:
        state.listeners.discard(listener)
        if state.listeners or self._channels.get(name) is not state:
            return
        del self._channels[name]
        if self._closing or not self.connected:
            return  # a reconnect subscribes only the channels still in use
        try:
            await self._send("UNSUBSCRIBE", name)
        except (RedisError, OSError) as error:
            log.debug("unsubscribe %r failed: %s", name, error)

    async def _send(self, *args: bytes | str) -> None:
        """Write one command on the shared connection, never during a reconnect."""
        async with self._lock:
            if not self.connected or self._connection is None:
                raise RedisConnectionError("the shared subscription is not connected")
            await self._connection.send_command(*args, check_health=False)

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

    async def _read_forever(self, connection: Connection) -> None:
        failures = 0
        try:
            while True:
                try:
                    if not self.connected:
                        await self._reconnect(connection)
                        failures = 0
                    await self._read_until_broken(connection)
                except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                    self.connected = False
                    failures += 1
                    delay_s = _backoff_s(failures)
                    log.warning(
                        "shared subscription lost (%s); reconnecting in %.2fs", error, delay_s
                    )
                    await asyncio.sleep(delay_s)
        except Exception:
            # A bug, not a Redis outage: end every stream so clients reconnect to a healthy
            # worker, and let readiness report the failure instead of hanging silently.
            log.exception("hub reader failed; ending all listeners")
            self.connected = False
            self._end_all(EndReason.HUB_FAILED)

    async def _reconnect(self, connection: Connection) -> None:
        """(Re)open the connection and subscribe every channel in use with one command."""
        first_time = self.stats.connects == 0
        async with self._lock:
            await connection.disconnect()
            await connection.connect()  # type: ignore[no-untyped-call]
            names = [self._control_channel, *self._channels]
            # Commands sent on the old connection will never be confirmed; the one below
            # confirms each channel exactly once.
            self._pending_acks = {
                name: deque([state.ready])
                for name, state in self._channels.items()
                if state.ready is not None and not state.ready.done()
            } | {
                name: waiting
                for name, waiting in self._pending_acks.items()
                if name == self._control_channel
            }
            await connection.send_command("SUBSCRIBE", *names, check_health=False)
            self.connected = True
        self.stats.connects += 1
        if not first_time:
            self.stats.reconnects += 1
            self._resync_pending = True

    async def _read_until_broken(self, connection: Connection) -> None:
        """Read and act on messages; pings a silent connection, gives up on a dead one."""
        pinged = False
        while True:
            response = await connection.read_response(
                timeout=self._idle_s, disconnect_on_error=False, push_request=True
            )
            if response is None:
                if pinged:
                    raise RedisConnectionError(f"no answer to PING within {self._idle_s}s")
                await self._send("PING")
                pinged = True
                continue
            pinged = False
            if isinstance(response, list) and len(response) == 3:
                self._handle(response[0], response[1], response[2])

    def _handle(self, kind: bytes, name: bytes, payload: Any) -> None:
        if kind == b"message":
            self._dispatch(name, payload)
        elif kind == b"subscribe":
            self._on_subscribed(name)
            if self._resync_pending:
                # The first confirmation of the re-subscribe command: all channels are live.
                self._resync_pending = False
                log.info(
                    "shared subscription re-established; %d channels resubscribed",
                    len(self._channels),
                )
                self._resync_all()

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
                    future.exception()  # retrieved: nobody may be waiting for it any more
        self._pending_acks.clear()


def _backoff_s(failures: int) -> float:
    """Capped exponential backoff with full jitter."""
    return random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**failures))
