"""One pub/sub connection to one Redis node, driven by hand: subscribe, read, ping, reconnect.

redis-py's PubSub reconnects inside its read call, so a command sent by another task at that
moment can hit a connection being replaced. A link instead serialises its writes, its
reconnects and its re-subscribe under one lock, and reports what it reads to its owner (the
hub). Plain pub/sub and Redis 7's sharded pub/sub differ only in command and message names.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.05
RECONNECT_CAP_S = 2.0
READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Dialect:
    """Command and message names of one flavour of pub/sub."""

    subscribe: str
    unsubscribe: str
    message: bytes
    subscribed: bytes
    unsubscribed: bytes


PLAIN = Dialect("SUBSCRIBE", "UNSUBSCRIBE", b"message", b"subscribe", b"unsubscribe")
SHARDED = Dialect("SSUBSCRIBE", "SUNSUBSCRIBE", b"smessage", b"ssubscribe", b"sunsubscribe")


class LinkOwner(Protocol):
    """What a link tells, and asks, the hub that owns it."""

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """A published message arrived."""

    def channels_of(self, link: PubSubLink) -> Sequence[bytes]:
        """Channels in use that this link must carry (re-subscribed after a reconnect)."""

    def on_resubscribed(self, link: PubSubLink) -> None:
        """The link is subscribed again after a reconnect; messages may have been missed."""

    def on_dropped(self, link: PubSubLink, channel: bytes) -> None:
        """The server unsubscribed `channel` on its own (its slot moved to another shard)."""

    def on_failed(self) -> None:
        """The link's reader stopped on an unexpected error."""


class PubSubLink:
    """A reconnecting pub/sub connection, shared by every channel routed to its node."""

    def __init__(
        self,
        name: str,
        connection: Connection,
        dialect: Dialect,
        owner: LinkOwner,
        idle_s: float,
    ) -> None:
        self.name = name
        self._connection = connection
        self._dialect = dialect
        self._owner = owner
        # Silence longer than this gets a PING; as long again without any answer means the
        # connection is dead even if TCP has not noticed (a partition, a frozen server).
        self._idle_s = idle_s
        self._lock = asyncio.Lock()
        # Futures of SUBSCRIBE commands not yet confirmed, per channel, in send order: Redis
        # confirms in order, so each confirmation completes the oldest one.
        self._acks: dict[bytes, deque[asyncio.Future[None]]] = {}
        # UNSUBSCRIBEs we sent and whose confirmation is due; any other unsubscribe
        # confirmation is the server dropping the channel.
        self._our_unsubscribes: dict[bytes, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._first_connect: asyncio.Future[None] | None = None
        self._resync_pending = False
        self.connected = False

    async def start(self, timeout_s: float) -> None:
        """Connect and start reading; raises if the first connection fails within `timeout_s`."""
        self._first_connect = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_forever(), name=f"pubsub-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(self._first_connect), timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop reading and disconnect."""
        await cancel_and_wait([self._reader])
        self._reader = None
        self.connected = False
        async with self._lock:
            await self._connection.disconnect()

    @property
    def running(self) -> bool:
        """False once the reader stopped for good."""
        return self._reader is not None and not self._reader.done()

    @property
    def connection(self) -> Connection:
        """The underlying connection (for the owner to give back to its pool)."""
        return self._connection

    async def subscribe(self, channel: bytes, confirmed: asyncio.Future[None]) -> None:
        """Send SUBSCRIBE; `confirmed` completes when Redis confirms it."""
        self._acks.setdefault(channel, deque()).append(confirmed)
        try:
            await self._send(self._dialect.subscribe, channel)
        except BaseException:
            waiting = self._acks.get(channel)
            if waiting and confirmed in waiting:
                waiting.remove(confirmed)
            raise

    async def unsubscribe(self, channel: bytes) -> None:
        """Send UNSUBSCRIBE (a no-op while disconnected: a reconnect skips unused channels)."""
        if not self.connected:
            return
        self._our_unsubscribes[channel] = self._our_unsubscribes.get(channel, 0) + 1
        await self._send(self._dialect.unsubscribe, channel)

    async def _send(self, *args: bytes | str) -> None:
        async with self._lock:
            if not self.connected:
                raise RedisConnectionError(f"pub/sub link {self.name} is not connected")
            await self._connection.send_command(*args, check_health=False)

    async def _read_forever(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    if not self.connected:
                        await self._reconnect()
                        failures = 0
                    await self._read_until_broken()
                except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                    self.connected = False
                    failures += 1
                    delay_s = _backoff_s(failures)
                    log.warning("pub/sub link %s lost (%s); reconnecting in %.2fs",
                                self.name, error, delay_s)
                    await asyncio.sleep(delay_s)
        except Exception:
            log.exception("pub/sub link %s failed", self.name)
            self.connected = False
            self._owner.on_failed()

    async def _reconnect(self) -> None:
        """(Re)open the connection and subscribe every channel in use with one command."""
        async with self._lock:
            await self._connection.disconnect()
            await self._connection.connect()  # type: ignore[no-untyped-call]
            channels = list(self._owner.channels_of(self))
            # Commands sent on the old connection will never be confirmed. The command below
            # confirms each channel once, for the latest subscriber of it.
            self._acks = {
                channel: deque(pending[-1:])
                for channel in channels
                if (pending := [f for f in self._acks.get(channel, ()) if not f.done()])
            }
            self._our_unsubscribes.clear()
            if channels:
                await self._connection.send_command(
                    self._dialect.subscribe, *channels, check_health=False
                )
            self.connected = True
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_result(None)
        elif channels:
            self._resync_pending = True
        else:
            self._owner.on_resubscribed(self)

    async def _read_until_broken(self) -> None:
        read_replies = self._reply_reader()
        pinged = False
        while True:
            replies = await read_replies()
            if replies is None:
                if pinged:
                    raise RedisConnectionError(f"no answer to PING within {self._idle_s}s")
                await self._send("PING")
                pinged = True
                continue
            pinged = False
            for reply in replies:
                if isinstance(reply, list) and len(reply) == 3:
                    self._handle(reply[0], reply[1], reply[2])
                elif isinstance(reply, hiredis.ReplyError):
                    raise RedisConnectionError(f"pub/sub link {self.name}: {reply}")

    def _reply_reader(self) -> Callable[[], Awaitable[list[Any] | None]]:
        """How to wait for replies: a list of them, or None after `idle_s` of silence.

        On a socket, whole reads are parsed here with hiredis. redis-py's `read_response`
        costs a timeout scope, a clock read and a debug log line per reply, and a busy link
        reads tens of thousands of replies a second, many per read. The in-process stand-in
        has no socket, so it is read through redis-py one reply at a time.
        """
        stream = getattr(self._connection, "_reader", None)  # private in redis-py: checked
        if isinstance(stream, asyncio.StreamReader):
            return functools.partial(_read_parsed, stream, hiredis.Reader(), self._idle_s)
        return self._read_one

    async def _read_one(self) -> list[Any] | None:
        reply = await self._connection.read_response(
            timeout=self._idle_s, disconnect_on_error=False, push_request=True
        )
        return None if reply is None else [reply]

    def _handle(self, kind: bytes, channel: bytes, payload: bytes) -> None:
        dialect = self._dialect
        if kind == dialect.message:
            self._owner.on_message(channel, payload)
        elif kind == dialect.subscribed:
            waiting = self._acks.get(channel)
            if waiting:
                _resolve(waiting.popleft())
                if not waiting:
                    del self._acks[channel]
            if self._resync_pending:
                # The first confirmation of the re-subscribe command: every channel is live.
                self._resync_pending = False
                self._owner.on_resubscribed(self)
        elif kind == dialect.unsubscribed:
            ours = self._our_unsubscribes.get(channel, 0)
            if ours > 1:
                self._our_unsubscribes[channel] = ours - 1
            elif ours == 1:
                del self._our_unsubscribes[channel]
            else:
                self._owner.on_dropped(self, channel)


async def _read_parsed(
    stream: asyncio.StreamReader, parser: hiredis.Reader, idle_s: float
) -> list[Any] | None:
    """Every complete reply in the next read of `stream`; None if it stays silent `idle_s`."""
    try:
        async with asyncio.timeout(idle_s):
            data = await stream.read(READ_SIZE)
    except TimeoutError:
        return None
    if not data:
        raise RedisConnectionError("redis closed the pub/sub connection")
    parser.feed(data)
    replies = []
    try:
        while (reply := parser.gets()) is not False:
            replies.append(reply)
    except hiredis.ProtocolError as error:
        # Garbage on the wire: start over on a new connection (and a new parser).
        raise RedisConnectionError(f"unreadable reply from redis: {error}") from None
    return replies


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _backoff_s(failures: int) -> float:
    """Capped exponential backoff with full jitter."""
    return random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**failures))

