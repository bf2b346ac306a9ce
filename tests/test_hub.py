"""The shared subscription: refcounting, bounded inboxes, slow listeners, reader failure."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import fakeredis
import pytest
import redis.asyncio as redis

from service.hub import Hub, HubClosedError
from service.keys import Keys
from service.mailbox import Incoming, Resync, StreamEnd
from service.publisher import Publisher
from service.redis.pubsub_link import PLAIN, SHARDED, Dialect
from service.resources import hub_key

from app_clients import MakeSettings, StartClient
from sse_reader import STREAM_OPENED, collect
from waiting import wait_for

pytestmark = pytest.mark.redis


@pytest.fixture
async def hub(redis_url: str) -> AsyncIterator[Hub]:
    client = redis.Redis.from_url(redis_url)
    hub = Hub(client, "test:hub", inbox_limit=3)
    await hub.start()
    yield hub
    await hub.close()
    await client.aclose()


async def numsub(client: redis.Redis, channel: str) -> int:
    return int((await client.pubsub_numsub(channel))[0][1])


async def test_first_listener_subscribes_and_last_unsubscribes(
    hub: Hub, redis_client: redis.Redis
) -> None:
    async with hub.listen("ch"):
        assert await numsub(redis_client, "ch") == 1
        async with hub.listen("ch"):
            assert hub.listeners_of("ch") == 2
            assert await numsub(redis_client, "ch") == 1
        assert await numsub(redis_client, "ch") == 1
    assert hub.channel_count == 0

    async def unsubscribed() -> bool:  # sent with the next batch, after this loop pass
        return await numsub(redis_client, "ch") == 0

    await wait_for(unsubscribed)


async def test_quick_leave_and_rejoin_keeps_the_channel_live(
    hub: Hub, redis_client: redis.Redis
) -> None:
    for _ in range(20):
        async with hub.listen("flap"):
            pass
    async with hub.listen("flap") as listener:
        await redis_client.publish("flap", b"1-0\n\nhello")
        items = await listener.take(2)
    assert [item.delivery.data for item in items if isinstance(item, Incoming)] == ["hello"]


async def test_a_last_listener_cancelled_while_leaving_still_unsubscribes(
    hub: Hub, redis_client: redis.Redis
) -> None:
    # A stream whose client goes away as it ends: its handler is cancelled as it leaves,
    # while the UNSUBSCRIBE waits to be sent (here: behind a link lock the test holds).
    entered, done = asyncio.Event(), asyncio.Event()

    async def listen_until_done() -> None:
        async with hub.listen("left-behind"):
            entered.set()
            await done.wait()

    leaving = asyncio.create_task(listen_until_done())
    async with asyncio.timeout(5):
        await entered.wait()
    assert await numsub(redis_client, "left-behind") == 1
    link = next(iter(hub._links.values()))
    await link._lock.acquire()
    try:
        done.set()

        async def waiting_to_unsubscribe() -> bool:
            return bool(link._lock._waiters)

        await wait_for(waiting_to_unsubscribe)
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
    finally:
        link._lock.release()
    assert hub.channel_count == 0

    async def unsubscribed() -> bool:
        return await numsub(redis_client, "left-behind") == 0

    await wait_for(unsubscribed)


async def test_a_full_inbox_ends_only_that_listener(hub: Hub, redis_client: redis.Redis) -> None:
    async with hub.listen("busy") as slow, hub.listen("busy") as fast:
        received: list[str] = []
        for n in range(1, 6):
            await redis_client.publish("busy", f"{n}-0\n\nm{n}".encode())
            items = await fast.take(2)
            received.extend(i.delivery.data for i in items if isinstance(i, Incoming))
        assert received == ["m1", "m2", "m3", "m4", "m5"]
        assert slow.ended is StreamEnd.SLOW
        assert fast.ended is None
    assert hub.stats.slow_listeners_dropped == 1


async def test_reader_failure_ends_listeners_and_refuses_new_ones(
    hub: Hub, redis_client: redis.Redis
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("handler exploded")

    async with hub.listen("doomed") as listener:
        hub.on_message = broken  # type: ignore[method-assign, assignment]  # the failure a bug would cause
        await redis_client.publish("doomed", b"1-0\n\nboom")
        await wait_for(lambda: _ended(listener))
        assert listener.ended is StreamEnd.HUB_FAILED
        assert not hub.connected
        # Neither a new channel nor one still held takes new listeners.
        for channel in ("later", "doomed"):
            with pytest.raises(HubClosedError):
                async with hub.listen(channel):
                    pass


async def _ended(listener: Any) -> bool:
    return listener.ended is not None


async def test_a_client_that_stops_reading_is_dropped_and_others_get_everything(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=redis_url, demo_runs=False, listener_queue_size=8)
    client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    stalled = await client.get("/sse/connect", params={"sessionId": "crowd"})
    reader = await client.get("/sse/connect", params={"sessionId": "crowd"})
    for response in (stalled, reader):
        await response.content.readuntil(STREAM_OPENED)
    publisher = Publisher(redis_client, Keys(), session_ttl_s=30, log_maxlen=1000)
    payload = "x" * 65536
    count = 300
    reading = asyncio.create_task(collect(reader, timeout_s=30))
    for n in range(count - 1):
        await publisher.publish("crowd", "", f"{n} {payload}")
    await publisher.publish("crowd", "finish", "end")
    events = await reading
    assert len(events) == count
    assert [e.data.split(" ")[0] for e in events[:-1]] == [str(n) for n in range(count - 1)]
    assert client.app[hub_key].stats.slow_listeners_dropped == 1
    stalled.close()


@contextlib.asynccontextmanager
async def limited_user(admin: redis.Redis, *channels: str) -> AsyncIterator[str]:
    """An ACL user that may use every command and key but only `channels`; yields its name."""
    name = f"limited-{secrets.token_hex(4)}"
    await admin.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{name}"],
        commands=["+@all"],
        keys=["*"],
        channels=list(channels),
    )
    try:
        yield name
    finally:
        await admin.acl_deluser(name)


async def test_a_refused_subscribe_answers_at_once_and_the_hub_stays_ready(
    redis_url: str, redis_client: redis.Redis
) -> None:
    async with limited_user(redis_client, "test:hub", "ok:*") as user:
        client = redis.Redis.from_url(redis_url, username=user, password=user)
        hub = Hub(client, "test:hub", inbox_limit=3)
        await hub.start()
        try:
            async with hub.listen("ok:1") as allowed:
                # Redis's NOPERM reply, not a confirmation timeout.
                with pytest.raises(HubClosedError, match="NOPERM"):
                    async with hub.listen("forbidden:1"):
                        pass
                assert hub.connected
                assert hub.channel_count == 1
                await redis_client.publish("ok:1", b"1-0\n\nstill served")
                items = await allowed.take(2)
                assert [i.delivery.data for i in items if isinstance(i, Incoming)] == [
                    "still served"
                ]
        finally:
            await hub.close()
            await client.aclose()


async def rejected_subscribes(client: redis.Redis) -> tuple[int, int]:
    """SUBSCRIBE commands Redis ran, and those it refused (INFO commandstats)."""
    stats = (await client.info("commandstats")).get("cmdstat_subscribe", {})
    return int(stats.get("calls", 0)), int(stats.get("rejected_calls", 0))


async def test_a_refused_batch_refuses_only_the_channel_redis_refuses_alone(
    redis_url: str, redis_client: redis.Redis
) -> None:
    async with limited_user(redis_client, "test:hub", "ok:*") as user:
        client = redis.Redis.from_url(redis_url, username=user, password=user)
        hub = Hub(client, "test:hub", inbox_limit=3)
        await hub.start()
        calls, rejected = await rejected_subscribes(redis_client)
        try:
            async with contextlib.AsyncExitStack() as stack:
                names = ["ok:1", "ok:2", "forbidden:1", "ok:3"]
                # Concurrent: one SUBSCRIBE for all four, which Redis refuses as a whole.
                entered = await asyncio.gather(
                    *(stack.enter_async_context(hub.listen(name)) for name in names),
                    return_exceptions=True,
                )
                assert isinstance(entered[2], HubClosedError)
                assert "NOPERM" in str(entered[2])
                assert not any(isinstance(e, BaseException) for e in entered[:2] + entered[3:])
                # The batch, then each channel alone: three run, one refused again.
                assert await rejected_subscribes(redis_client) == (calls + 3, rejected + 2)
                assert hub.connected
                assert hub.channel_count == 3
                await redis_client.publish("ok:3", b"1-0\n\nserved")
                items = await entered[3].take(2)  # type: ignore[union-attr]
                assert [i.delivery.data for i in items if isinstance(i, Incoming)] == ["served"]
        finally:
            await hub.close()
            await client.aclose()


async def test_a_channel_refused_on_resubscribe_ends_its_streams_and_only_those(
    redis_url: str, redis_client: redis.Redis
) -> None:
    async with limited_user(redis_client, "test:hub", "ok:*") as user:
        client = redis.Redis.from_url(redis_url, username=user, password=user)
        hub = Hub(client, "test:hub", inbox_limit=3)
        await hub.start()
        try:
            async with hub.listen("ok:kept") as kept, hub.listen("ok:revoked") as revoked:
                # Redis 7 cuts the connection of a client whose channels were revoked; the
                # link's re-subscribe of all three channels in one command is refused.
                await redis_client.acl_setuser(
                    user, enabled=True, reset_channels=True, channels=["test:hub", "ok:kept"]
                )
                await wait_for(lambda: _ended(revoked))
                assert revoked.ended is StreamEnd.HUB_FAILED
                assert kept.ended is None
                assert Resync.AFTER_RECONNECT in await kept.take(2)
                await redis_client.publish("ok:kept", b"1-0\n\nstill served")
                items = await kept.take(2)
                assert [i.delivery.data for i in items if isinstance(i, Incoming)] == [
                    "still served"
                ]
                assert hub.connected
                assert hub.channel_count == 1
        finally:
            await hub.close()
            await client.aclose()


async def test_a_link_that_cannot_subscribe_at_all_is_not_ready_and_ends_every_stream(
    redis_url: str, redis_client: redis.Redis
) -> None:
    async with limited_user(redis_client, "test:hub", "ok:*") as user:
        client = redis.Redis.from_url(redis_url, username=user, password=user)
        hub = Hub(client, "test:hub", inbox_limit=3)
        await hub.start()
        try:
            async with hub.listen("ok:1") as listener:
                await redis_client.acl_setuser(user, enabled=True, reset_channels=True)
                await wait_for(lambda: _ended(listener))
                assert listener.ended is StreamEnd.HUB_FAILED
                assert not hub.connected
                with pytest.raises(HubClosedError):
                    async with hub.listen("ok:2"):
                        pass
        finally:
            await hub.close()
            await client.aclose()


async def test_a_topology_task_that_dies_of_a_bug_fails_the_hub_rather_than_going_quiet(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> None:
        raise RuntimeError("slot table bug")

    monkeypatch.setattr(hub._topology, "refresh", broken)
    async with hub.listen("followed") as listener:
        (link,) = hub._links.values()
        hub.on_unreachable(link)  # what a link reports when a reconnect fails
        await wait_for(lambda: _ended(listener))
        assert listener.ended is StreamEnd.HUB_FAILED
        assert not hub.connected


async def test_closing_right_after_a_topology_task_was_started_leaves_nothing_unawaited(
    hub: Hub,
) -> None:
    (link,) = hub._links.values()
    hub.on_unreachable(link)  # its task has not run yet when the hub closes
    await hub.close()
    gc.collect()  # a coroutine never awaited would be reported (as an error) here


def resp(*parts: bytes | int) -> bytes:
    """A RESP2 array reply, as Redis writes pub/sub confirmations and messages."""
    encoded = [
        b":%d\r\n" % p if isinstance(p, int) else b"$%d\r\n%b\r\n" % (len(p), p) for p in parts
    ]
    return b"*%d\r\n" % len(parts) + b"".join(encoded)


class FedConnection:
    """A pub/sub connection whose replies the test writes, so it decides what one read holds."""

    def __init__(self) -> None:
        self._reader = asyncio.StreamReader()  # what PubSubLink reads from a real connection
        self.sent: list[tuple[Any, ...]] = []
        self.writes: list[list[tuple[Any, ...]]] = []
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1
        if self._reader.at_eof():
            self._reader = asyncio.StreamReader()

    def pack_commands(self, commands: list[list[Any]]) -> list[tuple[Any, ...]]:
        return [tuple(command) for command in commands]

    async def send_packed_command(
        self, commands: list[tuple[Any, ...]], check_health: bool = True
    ) -> None:
        del check_health
        self.sent.extend(commands)
        self.writes.append(commands)

    async def disconnect(self) -> None:
        pass

    async def send_command(self, *args: Any, check_health: bool = True) -> None:
        del check_health
        self.sent.append(args)
        self.writes.append([args])

    def subscribes(self, channel: bytes) -> int:
        return sum(
            1
            for args in self.sent
            if args[0].endswith("SUBSCRIBE")
            and channel in args
            and not args[0].endswith("UNSUBSCRIBE")
        )


class FedTopology:
    """One node, reached through a FedConnection."""

    watches_primary = False

    def __init__(self, connection: FedConnection, dialect: Dialect = PLAIN) -> None:
        self.connection = connection
        self.dialect = dialect

    def node_for(self, channel: bytes) -> str:
        return "fed"

    async def open_connection(self, node: str) -> Any:
        return self.connection

    async def release(self, connection: Any) -> None:
        pass

    async def refresh(self) -> None:
        pass

    async def misplaced(self, connection: Any) -> str | None:
        return None


async def test_a_moved_channel_replays_before_the_message_that_follows_its_confirmation() -> None:
    connection = FedConnection()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    hub = Hub(client, "ctl", inbox_limit=10)
    hub._topology = FedTopology(connection)

    async def confirmed(task: asyncio.Task[Any], channel: bytes, nth: int) -> Any:
        await wait_for(lambda: _true(connection.subscribes(channel) >= nth))
        connection._reader.feed_data(resp(b"subscribe", channel, 1))
        return await task

    await confirmed(asyncio.create_task(hub.start()), b"ctl", 1)
    try:
        async with contextlib.AsyncExitStack() as stack:
            entering = asyncio.create_task(stack.enter_async_context(hub.listen("ch")))
            listener = await confirmed(entering, b"ch", 1)
            (link,) = hub._links.values()
            hub.on_dropped(link, b"ch")  # as when the cluster moved the channel's slot
            await wait_for(lambda: _true(connection.subscribes(b"ch") == 2))
            # Redis may send a message published right after the subscribe in the same write
            # as the confirmation: the stream must replay what it missed before it writes it.
            connection._reader.feed_data(
                resp(b"subscribe", b"ch", 2) + resp(b"message", b"ch", b"9-0\n\nafter")
            )
            items = await listener.take(2)
            assert items[:1] == [Resync.AFTER_RECONNECT]
            assert [i.delivery.data for i in items if isinstance(i, Incoming)] == ["after"]
    finally:
        await hub.close()
        await client.aclose()


async def _true(value: bool) -> bool:
    return value


async def test_after_a_reconnect_each_slot_replays_before_its_next_message() -> None:
    """Sharded pub/sub re-subscribes one slot per command: a message on a slot already
    confirmed may come before the later slots' confirmations."""
    connection = FedConnection()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    hub = Hub(client, "ctl", inbox_limit=10)
    hub._topology = FedTopology(connection, SHARDED)

    async def confirmed(task: asyncio.Task[Any], channel: bytes) -> Any:
        await wait_for(lambda: _true(connection.subscribes(channel) >= 1))
        connection._reader.feed_data(resp(b"ssubscribe", channel, 1))
        return await task

    await confirmed(asyncio.create_task(hub.start()), b"ctl")
    try:
        async with contextlib.AsyncExitStack() as stack:
            first = await confirmed(
                asyncio.create_task(stack.enter_async_context(hub.listen("{a}"))), b"{a}"
            )
            await confirmed(
                asyncio.create_task(stack.enter_async_context(hub.listen("{b}"))), b"{b}"
            )
            connection._reader.feed_eof()  # the connection is lost; the link reconnects
            await wait_for(lambda: _true(connection.subscribes(b"{b}") == 2))
            connection._reader.feed_data(
                resp(b"ssubscribe", b"ctl", 1)
                + resp(b"ssubscribe", b"{a}", 2)
                + resp(b"smessage", b"{a}", b"9-0\n\nafter")
                + resp(b"ssubscribe", b"{b}", 3)
            )
            items = await first.take(2)
            assert items[:1] == [Resync.AFTER_RECONNECT]
            assert [i.delivery.data for i in items if isinstance(i, Incoming)] == ["after"]
    finally:
        await hub.close()
        await client.aclose()


async def start_fed(connection: FedConnection, dialect: Dialect) -> Hub:
    """A hub on `connection`, its control channel confirmed."""
    hub = Hub(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), "ctl", inbox_limit=10)
    hub._topology = FedTopology(connection, dialect)
    starting = asyncio.create_task(hub.start())
    await wait_for(lambda: _true(connection.subscribes(b"ctl") == 1))
    kind = b"ssubscribe" if dialect is SHARDED else b"subscribe"
    connection._reader.feed_data(resp(kind, b"ctl", 1))
    await starting
    return hub


async def test_sharded_listens_of_one_pass_go_in_one_write_one_command_per_slot() -> None:
    connection = FedConnection()
    hub = await start_fed(connection, SHARDED)
    channels = ["{a}:1", "{a}:2", "{b}:1", "{c}:1", "{b}:2"]
    try:
        async with contextlib.AsyncExitStack() as stack:
            entering = asyncio.gather(
                *(stack.enter_async_context(hub.listen(name)) for name in channels)
            )
            await wait_for(lambda: _true(len(connection.writes) == 2))
            assert connection.writes[1] == [
                ("SSUBSCRIBE", b"{a}:1", b"{a}:2"),
                ("SSUBSCRIBE", b"{b}:1", b"{b}:2"),
                ("SSUBSCRIBE", b"{c}:1"),
            ]
            connection._reader.feed_data(
                b"".join(
                    resp(b"ssubscribe", name.encode(), n)
                    for n, name in enumerate(["{a}:1", "{a}:2", "{b}:1", "{b}:2", "{c}:1"])
                )
            )
            await entering
            assert hub.connected
        await wait_for(lambda: _true(len(connection.writes) == 3))
        # Left in the reverse order: one write again, one command per slot.
        assert sorted(connection.writes[2]) == [
            ("SUNSUBSCRIBE", b"{a}:2", b"{a}:1"),
            ("SUNSUBSCRIBE", b"{b}:2", b"{b}:1"),
            ("SUNSUBSCRIBE", b"{c}:1"),
        ]
    finally:
        await hub.close()


async def test_a_reconnect_with_a_batch_in_flight_answers_every_listener() -> None:
    connection = FedConnection()
    hub = await start_fed(connection, PLAIN)
    try:
        async with contextlib.AsyncExitStack() as stack:
            entering = asyncio.gather(
                *(stack.enter_async_context(hub.listen(name)) for name in ("a", "b", "c"))
            )
            await wait_for(lambda: _true(len(connection.writes) == 2))
            assert connection.writes[1] == [("SUBSCRIBE", b"a", b"b", b"c")]
            # Only "a" is confirmed before the connection is lost.
            connection._reader.feed_data(resp(b"subscribe", b"a", 2))
            connection._reader.feed_eof()
            await wait_for(lambda: _true(len(connection.writes) == 3))
            assert connection.writes[2] == [("SUBSCRIBE", b"ctl", b"a", b"b", b"c")]
            connection._reader.feed_data(
                b"".join(resp(b"subscribe", c, n) for n, c in enumerate([b"ctl", b"a", b"b", b"c"]))
            )
            listeners = await entering
            await wait_for(lambda: _true(hub.connected))
            connection._reader.feed_data(resp(b"message", b"c", b"1-0\n\nafter"))
            items = await listeners[2].take(2)
            while not any(isinstance(i, Incoming) for i in items):
                items += await listeners[2].take(2)
            assert [i.delivery.data for i in items if isinstance(i, Incoming)] == ["after"]
            # Each channel replays what it may have missed, the one live before the loss too.
            assert await listeners[0].take(2) == [Resync.AFTER_RECONNECT]
    finally:
        await hub.close()
