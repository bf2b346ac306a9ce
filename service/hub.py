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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .mailbox import Incoming, Listener, Resync, StreamEnd
from .redis.pubsub_link import PubSubLink, SubscriptionRefusedError
from .redis.topology import topology_of
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0
# How long a channel whose slot moved keeps trying its new owner before its streams end.
REROUTE_DEADLINE_S = 15.0
REROUTE_BACKOFF_BASE_S = 0.05
REROUTE_BACKOFF_CAP_S = 1.0


@dataclass(slots=True)
class _Channel:
    link: PubSubLink
    ready: asyncio.Future[None]
    listeners: set[Listener] = field(default_factory=set)
    # Being subscribed on another node: its streams replay once that is confirmed.
    moving: bool = False
    # The worker's own check (the readiness canary), left out of the counts of client channels.
    probe: bool = False


@dataclass(slots=True)
class HubStats:
    """Counters exposed as metrics."""

    slow_listeners_dropped: int = 0
    reconnects: int = 0
    messages_received: int = 0


class HubClosedError(RedisConnectionError):
    """The shared subscription is closing, failed, or reconnecting.

    It is a Redis connection error on purpose: callers answer it like any Redis outage
    (503 with Retry-After), and the client retries, possibly on another worker.
    """


class Hub:
    """The worker's pub/sub connections, multiplexed over any number of local listeners.

    On a single Redis that is one connection. On a Redis Cluster it is one connection per
    shard that owns a channel in use (sharded pub/sub), never one per client. When a shard
    fails over, or a slot moves, the channels follow their slot to its new owner.
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        control_channel: str,
        inbox_limit: int,
        timeout_s: float = 2.0,
    ) -> None:
        self._topology = topology_of(redis, drain_s=timeout_s)
        self._control_channel = control_channel.encode()
        self._inbox_limit = inbox_limit
        self._timeout_s = timeout_s
        self._links: dict[str, PubSubLink] = {}
        self._links_lock = asyncio.Lock()
        # Every channel in use, the control channel included (it never has listeners).
        self._channels: dict[bytes, _Channel] = {}
        self._reroutes: dict[bytes, asyncio.Task[None]] = {}
        self._rehomes: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._failed = False
        self.stats = HubStats()

    async def start(self) -> None:
        """Connect and subscribe the control channel, so readiness means something at once."""
        state = await self._open_channel(self._control_channel)
        await asyncio.wait_for(asyncio.shield(state.ready), SUBSCRIBE_TIMEOUT_S)
        if self._topology.watches_primary:
            self._watcher = asyncio.create_task(
                self._guarded(self._watch_primary), name="hub-watch"
            )

    async def close(self) -> None:
        """End every listener, stop reading and give the connections back."""
        self._closing = True
        self._end_all(StreamEnd.SHUTDOWN)
        await cancel_and_wait([self._watcher, *self._reroutes.values(), *self._rehomes.values()])
        for link in self._links.values():
            await link.close()
            await self._topology.release(link.connection)
        self._links.clear()

    @property
    def connected(self) -> bool:
        """True while every pub/sub connection is up and subscribed (and the hub has not failed).

        A link whose node is unreachable keeps this false until its channels have moved to
        a node that answers (a failed-over shard's new primary): readiness tells the truth.
        """
        links = self._links.values()
        return bool(links) and not self._failed and all(link.connected for link in links)

    @property
    def failed(self) -> bool:
        """True once the hub stopped for good (a bug): only a restart brings the worker back."""
        return self._failed

    def end_listeners(self, reason: StreamEnd) -> None:
        """End every local listener now (graceful drain), keeping the subscriptions alive."""
        self._end_all(reason)

    @property
    def channel_count(self) -> int:
        """Channels this worker is subscribed to for listeners (not the control channel, nor
        a probe's)."""
        return sum(
            1 for name, state in self._channels.items()
            if not state.probe and name != self._control_channel
        )  # fmt: skip

    @property
    def link_count(self) -> int:
        """Pub/sub connections held: one, or one per cluster shard in use."""
        return len(self._links)

    @property
    def link_nodes(self) -> list[str]:
        """The nodes this worker holds a running pub/sub connection to (the canary's targets)."""
        return [name for name, link in self._links.items() if link.running]

    def node_for(self, channel: str) -> str:
        """The node whose pub/sub connection carries `channel`."""
        return self._topology.node_for(channel.encode())

    @property
    def listener_count(self) -> int:
        """Local listeners across all channels (a probe's left out)."""
        return sum(len(c.listeners) for c in self._channels.values() if not c.probe)

    def listeners_of(self, channel: str) -> int:
        """Local listeners of one channel."""
        state = self._channels.get(channel.encode())
        return len(state.listeners) if state else 0

    def listen(
        self, channel: str, *, coalescing: bool = False, probe: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Listener]:
        """A listener on `channel` whose subscription is live when the block starts.

        `coalescing`: for wake-up channels (see `Listener`); such a listener is never dropped
        as slow. `probe`: the worker's own check on the channel, not counted as a client's.
        Raises HubClosedError when the hub is closing or failed, or when the connection that
        must carry the channel is down (the caller answers 503 and the client retries).
        """
        return _Listening(self, channel.encode(), coalescing, probe)

    async def _join(self, name: bytes, coalescing: bool, probe: bool) -> tuple[_Channel, Listener]:
        if self._closing or self._failed:
            raise HubClosedError("the shared subscription is not running")
        listener = Listener(self._inbox_limit, coalescing=coalescing)
        state = self._channels.get(name) or await self._open_channel(name)
        state.probe = state.probe or probe
        state.listeners.add(listener)
        try:
            await _confirmed(state.ready)
        except BaseException:
            self._leave(name, state, listener)
            raise
        return state, listener

    async def _open_channel(self, name: bytes) -> _Channel:
        link = await self._link_for(name)
        if not link.up:
            raise HubClosedError(f"pub/sub link {link.name} is reconnecting to redis")
        existing = self._channels.get(name)
        if existing is not None:  # another listener opened it while we waited for the link
            return existing
        state = _Channel(link=link, ready=asyncio.get_running_loop().create_future())
        # Queued with whatever else this loop pass subscribes or unsubscribes on the link, and
        # in order with it: a leave of this channel just before has been queued already.
        link.subscribe(name, state.ready)
        self._channels[name] = state
        return state

    async def _link_for(self, channel: bytes) -> PubSubLink:
        node = self._topology.node_for(channel)
        link = self._links.get(node)
        if link is not None and link.running:
            return link
        async with self._links_lock:
            link = self._links.get(node)
            if link is None or not link.running:
                connection = await self._topology.open_connection(node)
                link = PubSubLink(node, connection, self._topology.dialect, self, self._timeout_s)
                try:
                    await link.start(SUBSCRIBE_TIMEOUT_S)
                except TimeoutError:
                    await self._topology.release(connection)
                    raise HubClosedError(f"redis node {node} did not answer") from None
                self._links[node] = link
        return link

    def _leave(self, name: bytes, state: _Channel, listener: Listener) -> None:
        """The last listener out unsubscribes; queued, so no cancellation can skip it."""
        state.listeners.discard(listener)
        if state.listeners or self._channels.get(name) is not state:
            return
        del self._channels[name]
        if not self._closing:
            # A reconnect subscribes only channels still in use, so nothing is left behind
            # if this is never sent.
            state.link.unsubscribe(name)

    # LinkOwner: what the pub/sub links report.

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """Fan a published message out to the channel's local listeners."""
        state = self._channels.get(channel)
        if state is None:
            return
        self.stats.messages_received += 1
        incoming = Incoming(payload)
        for listener in state.listeners:
            if not listener.offer(incoming):
                self.stats.slow_listeners_dropped += 1
                log.warning("dropped a slow listener on %s (inbox full)", channel.decode())

    def channels_of(self, link: PubSubLink) -> list[bytes]:
        """Channels in use routed to `link`, the control channel included."""
        return [name for name, state in self._channels.items() if state.link is link]

    def on_subscribed(self, link: PubSubLink, channel: bytes, resubscribed: bool) -> None:
        """A channel is live again after a reconnect or a move: its streams replay now.

        Now, not when whoever waits for the confirmation resumes: a message that Redis sent
        right after the confirmation is handed out before then, and a stream that wrote it
        first would replay only from there, skipping what it missed before.
        """
        state = self._channels.get(channel)
        if state is None or state.link is not link or not (resubscribed or state.moving):
            return
        state.moving = False
        _resync(state)

    def on_resubscribed(self, link: PubSubLink, channels: Sequence[bytes]) -> None:
        """The re-subscribe after a reconnect is answered (each channel replayed as confirmed)."""
        self.stats.reconnects += 1
        log.info(
            "pub/sub link %s re-established; %d channels resubscribed", link.name, len(channels)
        )

    def on_refused(self, link: PubSubLink, channels: Sequence[bytes], error: str) -> None:
        """Redis refused to subscribe `channels` here: follow a moved slot, else end streams.

        A refused re-subscribe of several channels is retried one channel at a time, so
        only the channels Redis refuses (a permission revoked, say) end their streams.
        """
        for name in channels:
            state = self._channels.get(name)
            if state is None or state.link is not link:
                continue
            live = state.ready.done() and state.ready.exception() is None
            if live and (_is_redirect(error) or len(channels) > 1):
                self._start_reroute(name, state)
            else:
                self._drop_channel(name, state, error)

    def on_dropped(self, link: PubSubLink, channel: bytes) -> None:
        """The cluster moved the channel's slot: subscribe it where it lives now."""
        state = self._channels.get(channel)
        if state is None or state.link is not link:
            return
        self._start_reroute(channel, state)

    def on_unreachable(self, link: PubSubLink) -> None:
        """A node does not answer: see whether its slots have a new owner (a failover)."""
        if self._closing or _running(self._rehomes.get(link.name)):
            return
        _own_task(self._rehomes, link.name, self._guarded(lambda: self._rehome(link)), "hub-rehome")

    def on_failed(self) -> None:
        """A link's reader died of a bug: end every stream rather than hang silently."""
        self._failed = True
        self._end_all(StreamEnd.HUB_FAILED)

    # Following the topology: moved slots, failed-over shards, a new Sentinel primary.

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run a topology task; if it dies of a bug, fail the hub rather than stop following.

        `work` is started here, not by the caller, so a task cancelled before it ran (the
        hub closing) leaves no coroutine behind that was never awaited.
        """
        try:
            await work()
        except Exception:
            log.exception("the hub stopped following the redis topology")
            self.on_failed()

    def _start_reroute(self, name: bytes, state: _Channel) -> None:
        if self._closing or _running(self._reroutes.get(name)):
            return  # the reroute under way retries on its own
        _own_task(
            self._reroutes, name, self._guarded(lambda: self._reroute(name, state)), "hub-reroute"
        )

    async def _reroute(self, name: bytes, state: _Channel) -> None:
        """Subscribe `name` on the node that owns its slot now; its streams then resync.

        Retried while the cluster is in transition (the new owner not known or not
        answering yet), up to REROUTE_DEADLINE_S; a refusal that is not a redirect, or the
        deadline, ends the channel's streams.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REROUTE_DEADLINE_S
        previous = state.link
        attempt = 0
        while True:
            if self._channels.get(name) is not state:
                return  # nobody listens any more
            try:
                await self._topology.refresh()
                link = await self._link_for(name)
                if not link.up:
                    raise HubClosedError(f"pub/sub link {link.name} is reconnecting to redis")
                state.link = link
                state.moving = True  # its streams replay when `link` confirms it
                confirmed: asyncio.Future[None] = loop.create_future()
                link.subscribe(name, confirmed)
                await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S)
                break
            except (RedisError, OSError, TimeoutError, LookupError) as error:
                attempt += 1
                refused = isinstance(error, SubscriptionRefusedError)
                if (refused and not _is_redirect(str(error))) or loop.time() >= deadline:
                    self._drop_channel(name, state, f"could not subscribe: {error}")
                    return
                log.info("channel %r not moved yet (attempt %d): %s", name, attempt, error)
                await asyncio.sleep(_backoff_s(attempt))
        log.info("channel %r now on %s (was %s)", name, state.link.name, previous.name)
        if previous is not state.link:
            await self._retire_if_unused(previous)

    async def _rehome(self, link: PubSubLink) -> None:
        """Move the channels of an unreachable node whose slots now belong to another node."""
        try:
            await self._topology.refresh()
        except (RedisError, OSError) as error:
            log.info("pub/sub link %s unreachable; topology not refreshed: %s", link.name, error)
            return
        moved = [
            (name, state) for name, state in self._channels.items()
            if state.link is link and self._topology.node_for(name) != link.name
        ]  # fmt: skip
        if moved:
            log.warning(
                "pub/sub link %s unreachable; %d channels move to their slots' new owners",
                link.name,
                len(moved),
            )
        for name, state in moved:
            self._start_reroute(name, state)
        await self._retire_if_unused(link)

    async def _retire_if_unused(self, link: PubSubLink) -> None:
        """Close a link that is down and carries nothing, so readiness stops waiting for it."""
        async with self._links_lock:
            if (
                self._closing
                or link.connected
                or self._links.get(link.name) is not link
                or any(state.link is link for state in self._channels.values())
            ):
                return
            del self._links[link.name]
        log.info("pub/sub link %s retired: its node is down and carries no channel", link.name)
        await link.close()
        await self._topology.release(link.connection)

    async def _watch_primary(self) -> None:
        """Move each link whose server is no longer the primary (Sentinel failed it over).

        A demoted or partitioned primary may keep a subscribed connection open, and a
        subscribed connection cannot ask the server for its role, so the question goes to
        the Sentinels instead, every `timeout_s`.
        """
        while True:
            await asyncio.sleep(self._timeout_s)
            for link in list(self._links.values()):
                if not link.up:
                    continue
                try:
                    problem = await self._topology.misplaced(link.connection)
                except (RedisError, OSError) as error:
                    log.info("could not check where the primary is: %s", error)
                    continue
                if problem is not None:
                    await link.reconnect(problem)

    def _drop_channel(self, name: bytes, state: _Channel, error: str) -> None:
        """`name` cannot be subscribed: its streams end (clients reconnect), nothing hangs."""
        if self._channels.get(name) is not state:
            return
        if name == self._control_channel:
            log.error("the control channel cannot be subscribed (%s): hub failed", error)
            self.on_failed()
            return
        log.warning(
            "channel %r cannot be subscribed (%s); ending its %d streams",
            name,
            error,
            len(state.listeners),
        )
        del self._channels[name]
        for listener in state.listeners:
            listener.end(StreamEnd.HUB_FAILED)
        if not state.ready.done():
            state.ready.set_exception(HubClosedError(error))
            state.ready.exception()  # marked retrieved: nobody may be waiting any more

    def _end_all(self, reason: StreamEnd) -> None:
        for state in self._channels.values():
            for listener in state.listeners:
                listener.end(reason)
            if not state.ready.done():
                state.ready.set_exception(HubClosedError(reason.value))
                state.ready.exception()  # marked retrieved: nobody may be waiting any more


class _Listening:
    """`Hub.listen`'s block: joins the channel on entry, leaves it on exit.

    A slotted object, not an async generator context manager: it is kept for as long as its
    stream is open, and the generator, its frame and the loop's weak reference to it cost
    some 600 bytes more a stream.
    """

    __slots__ = ("_coalescing", "_hub", "_listener", "_name", "_probe", "_state")

    def __init__(self, hub: Hub, name: bytes, coalescing: bool, probe: bool) -> None:
        self._hub = hub
        self._name = name
        self._coalescing = coalescing
        self._probe = probe
        self._state: _Channel | None = None
        self._listener: Listener | None = None

    async def __aenter__(self) -> Listener:
        self._state, self._listener = await self._hub._join(
            self._name, self._coalescing, self._probe
        )
        return self._listener

    async def __aexit__(self, *exc_info: object) -> None:
        state, listener = self._state, self._listener
        if state is not None and listener is not None:
            self._state = self._listener = None
            self._hub._leave(self._name, state, listener)


async def _confirmed(ready: asyncio.Future[None]) -> None:
    """Wait until a channel's subscription is confirmed; HubClosedError if it is not."""
    if not ready.done():
        try:
            await asyncio.wait_for(asyncio.shield(ready), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            raise HubClosedError("redis did not confirm the subscription") from None
        except HubClosedError:
            raise
        except RedisError as error:
            raise HubClosedError(f"redis refused the subscription: {error}") from None
    elif ready.exception() is not None:
        raise HubClosedError(f"redis refused the subscription: {ready.exception()}")


_K = TypeVar("_K")


def _running(task: asyncio.Task[None] | None) -> bool:
    return task is not None and not task.done()


def _own_task(
    tasks: dict[_K, asyncio.Task[None]], key: _K, work: Coroutine[Any, Any, None], name: str
) -> None:
    """Start `work` as tasks[key]; the entry goes when that task ends (not a later one)."""
    task = asyncio.create_task(work, name=name)
    tasks[key] = task

    def forget(done: asyncio.Task[None]) -> None:
        if tasks.get(key) is done:
            del tasks[key]

    task.add_done_callback(forget)


# Replies that mean "not here": the slot lives, or is about to live, on another node.
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


def _is_redirect(error: str) -> bool:
    return error.split(" ", 1)[0] in _REDIRECTS


def _backoff_s(attempt: int) -> float:
    return min(REROUTE_BACKOFF_CAP_S, REROUTE_BACKOFF_BASE_S * 2.0**attempt)


def _resync(state: _Channel) -> None:
    for listener in state.listeners:
        listener.offer(Resync.AFTER_RECONNECT)
