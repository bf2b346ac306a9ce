"""One pub/sub connection to one Redis node, driven by hand: subscribe, read, ping, reconnect.

redis-py's PubSub reconnects inside its read call, so a command sent by another task at that
moment can hit a connection being replaced. A link instead serialises its writes, its
reconnects and its re-subscribe under one lock, and reports what it reads to its owner (the
hub). Plain pub/sub and Redis 7's sharded pub/sub differ in command and message names, and
in one rule: the channels of one SSUBSCRIBE must share a hash slot.

Redis answers a connection's commands in the order they were sent, so the link keeps the
commands whose answers are due in a queue, and every reply, error replies included, is
matched to the command it answers. A refused subscribe is reported to the owner with the
channels it carried; it is never retried blindly on a new connection.

Subscribes and unsubscribes are not sent by their callers: they are queued, and whatever one
event-loop pass queued goes out in one write, one command for all its channels (one per hash
slot on sharded pub/sub), so a storm of connects and closes costs Redis one read and a few
commands per pass instead of one each. A channel's last request in a batch wins (a channel
left and opened again in one pass stays subscribed). An error reply answers a whole command,
so a refused command of several new channels is sent again one channel per command, once, on
the same connection: only a channel refused on its own is reported.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import hiredis
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..tasks import cancel_and_wait

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
    # Sharded pub/sub: the channels of one subscribe command must hash to one slot.
    one_slot_per_command: bool = False


PLAIN = Dialect("SUBSCRIBE", "UNSUBSCRIBE", b"message", b"subscribe", b"unsubscribe")
SHARDED = Dialect(
    "SSUBSCRIBE", "SUNSUBSCRIBE", b"smessage", b"ssubscribe", b"sunsubscribe",
    one_slot_per_command=True,
)  # fmt: skip


def subscribe_batches(dialect: Dialect, channels: Iterable[bytes]) -> list[list[bytes]]:
    """`channels` split into the subscribe commands Redis accepts, each channel once.

    Plain pub/sub takes them all in one command. Sharded pub/sub refuses a command whose
    channels span hash slots (CROSSSLOT), and every session channel has a slot of its own, so
    there it is one command per slot.
    """
    unique = list(dict.fromkeys(channels))
    if not unique:
        return []
    if not dialect.one_slot_per_command:
        return [unique]
    by_slot: dict[int, list[bytes]] = {}
    for channel in unique:
        by_slot.setdefault(key_slot(channel), []).append(channel)
    return list(by_slot.values())


class SubscriptionRefusedError(RedisConnectionError):
    """Redis answered a subscribe with an error; the channel is not subscribed.

    A connection error on purpose: whoever waited for the subscription answers it like any
    Redis outage (503 with Retry-After), and the client retries.
    """


class LinkOwner(Protocol):
    """What a link tells, and asks, the hub that owns it."""

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """A published message arrived."""

    def channels_of(self, link: PubSubLink) -> Sequence[bytes]:
        """Channels in use that this link must carry (re-subscribed after a reconnect)."""

    def on_subscribed(self, link: PubSubLink, channel: bytes, resubscribed: bool) -> None:
        """Redis confirmed `channel` (`resubscribed`: again, after a reconnect).

        Told before any reply that follows the confirmation is handled, so whatever must
        happen before the channel's next message (a replay of what was missed) happens first.
        """

    def on_resubscribed(self, link: PubSubLink, channels: Sequence[bytes]) -> None:
        """The re-subscribe after a reconnect is answered; `channels` are subscribed again."""

    def on_refused(self, link: PubSubLink, channels: Sequence[bytes], error: str) -> None:
        """Redis answered the subscribe of `channels` with `error`: they are not subscribed."""

    def on_dropped(self, link: PubSubLink, channel: bytes) -> None:
        """The server unsubscribed `channel` on its own (its slot moved to another shard)."""

    def on_unreachable(self, link: PubSubLink) -> None:
        """A reconnect failed: the node may be gone for good (its shard failed over)."""

    def on_failed(self) -> None:
        """The link's reader stopped on an unexpected error."""


class _Kind(Enum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PING = "ping"


@dataclass(slots=True)
class _Request:
    """What a channel's next batch asks for: subscribe (with who waits), or unsubscribe."""

    subscribe: bool
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # Sent in a command of its own: its share of a refused batch, asked again.
    alone: bool = False


@dataclass(slots=True)
class _Due:
    """A command sent on the current connection whose reply has not arrived yet."""

    kind: _Kind
    # Subscribe: the channels still to be confirmed, in the order Redis confirms them.
    channels: deque[bytes] = field(default_factory=deque)
    # Who waits for a channel's confirmation.
    waiters: dict[bytes, list[asyncio.Future[None]]] = field(default_factory=dict)
    # Part of the re-subscribe that follows a reconnect.
    resubscribe: bool = False


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
        self._due: deque[_Due] = deque()
        # Requests the next batch sends, in the order they came; the task that sends them.
        self._queued: dict[bytes, _Request] = {}
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._first_connect: asyncio.Future[None] | None = None
        # Re-subscribe commands not answered yet, and the channels they confirmed so far.
        self._resubscribes_due = 0
        self._resubscribed: list[bytes] = []
        self._answered = False
        # `up`: the socket is open and commands may be sent. `connected`: up, and every
        # channel of the last (re)subscribe has been answered.
        self.up = False
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
        """Stop reading and sending, and disconnect."""
        await cancel_and_wait([self._reader, self._sender])
        self._reader = self._sender = None
        self.up = self.connected = False
        async with self._lock:
            await self._connection.disconnect()
        self._fail_waiters(self._due, "the pub/sub link closed")
        self._due.clear()
        _fail([f for request in self._queued.values() for f in request.waiters], "closed")
        self._queued.clear()

    @property
    def running(self) -> bool:
        """False once the reader stopped for good."""
        return self._reader is not None and not self._reader.done()

    @property
    def connection(self) -> Connection:
        """The underlying connection (for the owner to give back to its pool)."""
        return self._connection

    def subscribe(self, channel: bytes, confirmed: asyncio.Future[None]) -> None:
        """Queue SUBSCRIBE; `confirmed` completes when Redis confirms it, or fails if refused.

        Raises RedisConnectionError while the link is down.
        """
        if not self.up:
            raise RedisConnectionError(f"pub/sub link {self.name} is not connected")
        request = self._queued.get(channel)
        if request is None or not request.subscribe:
            self._queued[channel] = request = _Request(subscribe=True)
        request.waiters.append(confirmed)
        self._send_soon()

    def unsubscribe(self, channel: bytes) -> None:
        """Queue UNSUBSCRIBE (a no-op while disconnected: a reconnect skips unused channels)."""
        if not self.up:
            return
        request = self._queued.get(channel)
        if request is not None and request.subscribe:
            # Whoever waited for it has left: the channel is unsubscribed instead.
            _fail(request.waiters, "the channel is no longer in use")
        self._queued[channel] = _Request(subscribe=False)
        self._send_soon()

    async def reconnect(self, reason: str) -> None:
        """Drop the connection now; the reader connects again and re-subscribes."""
        async with self._lock:
            if not self.up:
                return
            log.warning("pub/sub link %s: reconnecting: %s", self.name, reason)
            self.up = self.connected = False
            # The reader sees the closed socket and takes the usual reconnect path.
            await self._connection.disconnect()

    def _send_soon(self) -> None:
        """Have what is queued sent once this loop pass is over (with what else it queues)."""
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued(), name=f"pubsub-{self.name}-send")

    async def _send_queued(self) -> None:
        try:
            while self._queued:
                async with self._lock:
                    if not self.up:
                        return  # the reconnect takes over what is queued
                    if self._queued:
                        await self._send_batch()
        except Exception:
            log.exception("pub/sub link %s: sending failed", self.name)
            self.up = self.connected = False
            self._owner.on_failed()
        finally:
            self._sender = None

    async def _send_batch(self) -> None:
        """Send every queued request in one write: subscribes first, then unsubscribes."""
        queued, self._queued = self._queued, {}
        together = [c for c, r in queued.items() if r.subscribe and not r.alone]
        batches = subscribe_batches(self._dialect, together)
        batches += [[c] for c, r in queued.items() if r.subscribe and r.alone]
        dues = [
            _Due(_Kind.SUBSCRIBE, deque(batch), {c: queued[c].waiters for c in batch})
            for batch in batches
        ]
        commands: list[list[bytes | str]] = [[self._dialect.subscribe, *b] for b in batches]
        for batch in subscribe_batches(
            self._dialect, [c for c, r in queued.items() if not r.subscribe]
        ):
            dues.append(_Due(_Kind.UNSUBSCRIBE, deque(batch)))
            commands.append([self._dialect.unsubscribe, *batch])
        packed = self._connection.pack_commands(commands)
        self._due.extend(dues)
        try:
            await self._connection.send_packed_command(packed, check_health=False)
        except (RedisError, OSError, RuntimeError) as error:
            # RuntimeError: uvloop's answer to a write on a transport already closed. The
            # reader finds the connection closed and reconnects; the re-subscribe answers
            # whoever waits for a channel still in use.
            log.warning("pub/sub link %s: sending failed: %s", self.name, error)
            self.up = self.connected = False

    async def _send_due(self, due: _Due, *args: bytes | str) -> None:
        async with self._lock:
            if not self.up:
                raise RedisConnectionError(f"pub/sub link {self.name} is not connected")
            self._due.append(due)
            await self._connection.send_command(*args, check_health=False)

    async def _send(self, *args: bytes | str) -> None:
        """Send a command whose reply nobody expects (its reply reads as out of order)."""
        async with self._lock:
            if not self.up:
                raise RedisConnectionError(f"pub/sub link {self.name} is not connected")
            await self._connection.send_command(*args, check_health=False)

    async def _read_forever(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    if not self.up:
                        await self._reconnect()
                    await self._read_until_broken()
                except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                    self.up = self.connected = False
                    # Backoff grows until the server answers something on a new connection,
                    # so a connection that breaks right after every connect is not hammered.
                    failures = 1 if self._answered else failures + 1
                    self._answered = False
                    delay_s = _backoff_s(failures)
                    log.warning(
                        "pub/sub link %s lost (%s); reconnecting in %.2fs",
                        self.name,
                        error,
                        delay_s,
                    )
                    if failures > 1 or isinstance(error, RedisTimeoutError):
                        self._owner.on_unreachable(self)
                    await asyncio.sleep(delay_s)
        except Exception:
            log.exception("pub/sub link %s failed", self.name)
            self.up = self.connected = False
            self._owner.on_failed()

    async def _reconnect(self) -> None:
        """(Re)open the connection and subscribe every channel in use, one command per batch."""
        async with self._lock:
            await self._connection.disconnect()
            await self._connection.connect()  # type: ignore[no-untyped-call]
            channels = list(self._owner.channels_of(self))
            # Commands sent on the old connection will never be answered. Whoever waits for a
            # channel that is still in use is answered by the re-subscribe below instead.
            waiting: dict[bytes, list[asyncio.Future[None]]] = {}
            for due in self._due:
                for channel, futures in due.waiters.items():
                    waiting.setdefault(channel, []).extend(f for f in futures if not f.done())
            self._due.clear()
            # Requests not sent yet: the re-subscribe is what they would have asked for.
            for channel, request in self._queued.items():
                waiting.setdefault(channel, []).extend(request.waiters)
            self._queued.clear()
            batches = subscribe_batches(self._dialect, channels)
            for batch in batches:
                self._due.append(_Due(
                    _Kind.SUBSCRIBE, deque(batch),
                    {c: waiting.pop(c) for c in batch if c in waiting}, resubscribe=True,
                ))  # fmt: skip
            _fail(
                [f for futures in waiting.values() for f in futures],
                "the channel is no longer in use",
            )
            self._resubscribes_due = len(batches)
            self._resubscribed = []
            if batches:
                # Pipelined: one write however many slots the channels span.
                commands: list[list[bytes | str]] = [
                    [self._dialect.subscribe, *batch] for batch in batches
                ]
                await self._connection.send_packed_command(
                    self._connection.pack_commands(commands), check_health=False
                )
            self.up = True
            self.connected = not batches
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_result(None)
            self._resubscribes_due = 0  # a first subscribe is not a resync
            self.connected = True
        elif not batches:
            self._owner.on_resubscribed(self, [])

    async def _read_until_broken(self) -> None:
        read_replies = self._reply_reader()
        pinged = False
        while True:
            replies = await read_replies()
            if replies is None:
                if pinged:
                    raise RedisTimeoutError(f"no answer to PING within {self._idle_s}s")
                await self._send_due(_Due(_Kind.PING), "PING")
                pinged = True
                continue
            pinged = False
            for reply in replies:
                self._dispatch(reply)

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
        try:
            reply = await self._connection.read_response(
                timeout=self._idle_s, disconnect_on_error=False, push_request=True
            )
        except ResponseError as error:  # redis-py raises error replies; they answer a command
            return [error]
        return None if reply is None else [reply]

    def _dispatch(self, reply: Any) -> None:
        if isinstance(reply, list):
            if len(reply) == 3 and reply[0] == self._dialect.message:
                self._owner.on_message(reply[1], reply[2])  # the hot path: checked first
                return
            self._answered = True
            if len(reply) == 3:
                self._confirm(reply[0], reply[1])
            elif reply and reply[0] == b"pong":
                self._pong()
        elif isinstance(reply, hiredis.ReplyError | ResponseError):
            self._refuse(str(reply))
        elif reply == b"PONG":  # the in-process stand-in answers as outside pub/sub
            self._answered = True
            self._pong()

    def _pong(self) -> None:
        if self._due and self._due[0].kind is _Kind.PING:
            self._due.popleft()

    def _confirm(self, kind: bytes, channel: bytes) -> None:
        head = self._due[0] if self._due else None
        if kind == self._dialect.subscribed:
            if head is None or head.kind is not _Kind.SUBSCRIBE or not head.channels:
                return
            if head.channels[0] != channel:
                raise RedisConnectionError(
                    f"pub/sub link {self.name}: confirmation of {channel!r} out of order"
                )
            head.channels.popleft()
            resubscribed = head.resubscribe and self._resubscribes_due > 0
            self._owner.on_subscribed(self, channel, resubscribed)
            for future in head.waiters.pop(channel, ()):
                _resolve(future)
            if resubscribed:
                self._resubscribed.append(channel)
            if not head.channels:
                self._due.popleft()
                self._answered_one(head)
        elif kind == self._dialect.unsubscribed:
            if (
                head is not None
                and head.kind is _Kind.UNSUBSCRIBE
                and head.channels
                and head.channels[0] == channel
            ):
                head.channels.popleft()
                if not head.channels:
                    self._due.popleft()
            else:
                self._owner.on_dropped(self, channel)

    def _refuse(self, error: str) -> None:
        """An error reply: it answers the oldest command still due."""
        if not self._due:
            # Nothing asked for it: the connection is out of step with us. Start over.
            raise RedisConnectionError(f"pub/sub link {self.name}: unexpected reply: {error}")
        head = self._due.popleft()
        if head.kind is _Kind.SUBSCRIBE and not head.resubscribe and len(head.channels) > 1:
            self._ask_alone(head, error)
        elif head.kind is _Kind.SUBSCRIBE:
            channels = list(head.channels)
            log.warning(
                "pub/sub link %s: subscribe of %d channel(s) refused: %s",
                self.name,
                len(channels),
                error,
            )
            self._fail_waiters([head], error)
            self._answered_one(head)
            self._owner.on_refused(self, channels, error)
        elif head.kind is _Kind.PING:
            raise RedisConnectionError(f"pub/sub link {self.name}: PING refused: {error}")
        else:
            log.info("pub/sub link %s: unsubscribe refused: %s", self.name, error)

    def _ask_alone(self, refused: _Due, error: str) -> None:
        """Queue each channel of a refused batch again in a command of its own.

        Requests from several connects shared the command, and one error answers all of
        them: a channel is reported refused only when Redis refuses it on its own.
        """
        log.info(
            "pub/sub link %s: subscribe of %d channels refused (%s); asking for each alone",
            self.name,
            len(refused.channels),
            error,
        )
        in_use = set(self._owner.channels_of(self))
        for channel in refused.channels:
            waiters = refused.waiters.get(channel, [])
            request = self._queued.get(channel)
            if channel not in in_use or (request is not None and not request.subscribe):
                _fail(waiters, "the channel is no longer in use")
                continue
            if request is None:
                self._queued[channel] = request = _Request(subscribe=True)
            request.waiters.extend(waiters)
            request.alone = True
        self._send_soon()

    def _answered_one(self, due: _Due) -> None:
        if not due.resubscribe or self._resubscribes_due == 0:
            return
        self._resubscribes_due -= 1
        if self._resubscribes_due == 0:
            # Redis answers in order: every channel of the re-subscribe is live (or refused).
            self.connected = True
            channels, self._resubscribed = self._resubscribed, []
            self._owner.on_resubscribed(self, channels)

    @staticmethod
    def _fail_waiters(dues: Iterable[_Due], error: str) -> None:
        _fail([f for due in dues for futures in due.waiters.values() for f in futures], error)


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


def _fail(futures: Iterable[asyncio.Future[None]], error: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(SubscriptionRefusedError(error))
            future.exception()  # retrieved: whoever waited may have given up already


def _backoff_s(failures: int) -> float:
    """Capped exponential backoff with full jitter."""
    return random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**failures))
