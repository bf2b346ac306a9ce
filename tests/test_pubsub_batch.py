"""The pub/sub link batches: whole socket reads parsed at once (many replies per read, split
replies, errors), and the subscribes and unsubscribes of one loop pass sent as one command."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hiredis
import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from service.hub import Hub
from service.keys import Keys
from service.mailbox import Incoming, Listener, Resync
from service.redis import pubsub_link
from service.redis.connections import RedisOpener
from service.resources import hub_key, publisher_key

from app_clients import AppClient, MakeSettings, StartClient
from redis_state import RedisTarget
from sse_reader import STREAM_OPENED, collect
from waiting import wait_for


def message(channel: bytes, payload: bytes) -> bytes:
    """A pub/sub message as Redis sends it (RESP2)."""
    parts = [b"message", channel, payload]
    return b"*3\r\n" + b"".join(b"$%d\r\n%b\r\n" % (len(part), part) for part in parts)


def stream_with(data: bytes = b"") -> asyncio.StreamReader:
    stream = asyncio.StreamReader()
    if data:
        stream.feed_data(data)
    return stream


async def test_every_complete_reply_in_one_read_is_returned_in_order() -> None:
    payloads = [f"{n}-0\n\nm{n}".encode() for n in range(50)]
    stream = stream_with(b"".join(message(b"ch", p) for p in payloads))
    replies = await pubsub_link._read_parsed(stream, hiredis.Reader(), 1.0)
    assert replies == [[b"message", b"ch", p] for p in payloads]


async def test_a_reply_split_across_reads_is_returned_once_complete() -> None:
    whole = message(b"ch", b"1-0\n\n" + b"z" * 1000)
    stream = stream_with(whole[:600])
    parser = hiredis.Reader()
    assert await pubsub_link._read_parsed(stream, parser, 1.0) == []
    stream.feed_data(whole[600:] + message(b"ch", b"2-0\n\nnext")[:5])
    assert await pubsub_link._read_parsed(stream, parser, 1.0) == [
        [b"message", b"ch", b"1-0\n\n" + b"z" * 1000]
    ]


async def test_an_error_reply_is_returned_as_a_reply_error() -> None:
    stream = stream_with(message(b"ch", b"1-0\n\na") + b"-ERR no such thing\r\n")
    replies = await pubsub_link._read_parsed(stream, hiredis.Reader(), 1.0)
    assert replies is not None
    assert replies[0] == [b"message", b"ch", b"1-0\n\na"]
    assert isinstance(replies[1], hiredis.ReplyError)
    assert str(replies[1]) == "ERR no such thing"


async def test_silence_is_none_and_a_closed_connection_an_error() -> None:
    stream = stream_with()
    assert await pubsub_link._read_parsed(stream, hiredis.Reader(), 0.02) is None
    stream.feed_eof()
    with pytest.raises(RedisConnectionError, match="closed"):
        await pubsub_link._read_parsed(stream, hiredis.Reader(), 1.0)


async def test_garbage_on_the_wire_is_a_connection_error_not_a_crash() -> None:
    stream = stream_with(message(b"ch", b"1-0\n\na") + b"?not resp\r\n")
    with pytest.raises(RedisConnectionError, match="unreadable"):
        await pubsub_link._read_parsed(stream, hiredis.Reader(), 1.0)


ReadParsed = Callable[[asyncio.StreamReader, hiredis.Reader, float], Awaitable[Any]]


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of replies each socket read of a pub/sub link yielded."""
    sizes: list[int] = []
    original: ReadParsed = pubsub_link._read_parsed

    async def counted(
        stream: asyncio.StreamReader, parser: hiredis.Reader, idle_s: float
    ) -> list[Any] | None:
        replies: list[Any] | None = await original(stream, parser, idle_s)
        if replies is not None:
            sizes.append(len(replies))
        return replies

    monkeypatch.setattr(pubsub_link, "_read_parsed", counted)
    return sizes


@pytest.fixture
async def hub(redis_url: str, batch_sizes: list[int]) -> AsyncIterator[Hub]:
    client = redis.Redis.from_url(redis_url)
    hub = Hub(client, "test:hub", inbox_limit=1000, timeout_s=1.0)
    await hub.start()
    yield hub
    await hub.close()
    await client.aclose()


async def take_incoming(listener: Listener, count: int) -> list[bytes]:
    payloads: list[bytes] = []
    async with asyncio.timeout(5):
        while len(payloads) < count:
            items = await listener.take(1)
            payloads.extend(i.payload for i in items if isinstance(i, Incoming))
            assert listener.ended is None
    return payloads


@pytest.mark.redis
async def test_a_pipelined_burst_reaches_the_listener_whole_and_in_order(
    hub: Hub, redis_client: redis.Redis, batch_sizes: list[int]
) -> None:
    payloads = [f"{n}-0\n\n{n} {'p' * (n % 97)}".encode() for n in range(1, 501)]
    async with hub.listen("burst") as listener:
        async with redis_client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.publish("burst", payload)
            receivers = await pipe.execute()
        assert receivers == [1] * 500
        assert await take_incoming(listener, 500) == payloads
    assert max(batch_sizes) > 10  # many messages came out of single reads
    assert hub.stats.messages_received == 500


@pytest.mark.redis
async def test_an_error_reply_on_the_link_reconnects_and_resyncs(
    hub: Hub, redis_client: redis.Redis
) -> None:
    async with hub.listen("errs") as listener:
        (link,) = hub._links.values()
        # An error reply on the subscribed connection (an unknown command gets one).
        await link._send("NOSUCHCOMMAND")

        async def reconnected() -> bool:
            return hub.stats.reconnects == 1 and hub.connected

        await wait_for(reconnected)
        assert await listener.take(1) == [Resync.AFTER_RECONNECT]
        await redis_client.publish("errs", b"1-0\n\nstill here")
        assert await take_incoming(listener, 1) == [b"1-0\n\nstill here"]
        assert listener.ended is None


async def command_calls(client: redis.Redis, command: str) -> int:
    """How many times Redis ran `command` (INFO commandstats), refusals left out."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.redis
async def test_concurrent_listens_subscribe_in_one_command_and_leave_in_one(
    hub: Hub, redis_client: redis.Redis
) -> None:
    channels = [f"many:{n}" for n in range(50)]
    subscribes = await command_calls(redis_client, "subscribe")
    unsubscribes = await command_calls(redis_client, "unsubscribe")
    async with contextlib.AsyncExitStack() as stack:
        listeners = await asyncio.gather(
            *(stack.enter_async_context(hub.listen(channel)) for channel in channels)
        )
        assert await command_calls(redis_client, "subscribe") == subscribes + 1
        assert await redis_client.pubsub_numsub(*channels) == [(c.encode(), 1) for c in channels]
        await redis_client.publish("many:7", b"1-0\n\nseven")
        assert await take_incoming(listeners[7], 1) == [b"1-0\n\nseven"]
    # Every listener left in the same loop pass.

    async def unsubscribed() -> bool:
        counts = await redis_client.pubsub_numsub(*channels)
        return all(count == 0 for _, count in counts)

    await wait_for(unsubscribed)
    assert await command_calls(redis_client, "unsubscribe") == unsubscribes + 1
    assert hub.channel_count == 0


@pytest.mark.redis
async def test_a_channel_left_and_opened_again_in_one_pass_stays_subscribed(
    hub: Hub, redis_client: redis.Redis
) -> None:
    first = hub.listen("again")
    await first.__aenter__()
    subscribes = await command_calls(redis_client, "subscribe")
    unsubscribes = await command_calls(redis_client, "unsubscribe")
    second = hub.listen("again")
    await first.__aexit__(None, None, None)  # the last listener leaves: UNSUBSCRIBE queued
    listener = await second.__aenter__()  # opened again before that was sent
    try:
        assert await redis_client.publish("again", b"1-0\n\nstill live") == 1
        assert await take_incoming(listener, 1) == [b"1-0\n\nstill live"]
        # The later request won: the channel was subscribed again, never unsubscribed.
        assert await command_calls(redis_client, "subscribe") == subscribes + 1
        assert await command_calls(redis_client, "unsubscribe") == unsubscribes
    finally:
        await second.__aexit__(None, None, None)


async def node_client_for(target: RedisTarget, channel: str) -> redis.Redis:
    """A plain client on the node that serves `channel` (its shard on a cluster)."""
    if not target.cluster:
        return redis.Redis.from_url(target.url)
    cluster = target.client()
    assert isinstance(cluster, RedisCluster)
    await cluster.initialize()
    node = cluster.get_node_from_key(channel)
    await cluster.aclose()
    assert node is not None
    return redis.Redis(host=node.host, port=int(node.port))


@pytest.mark.redis
async def test_a_stream_gets_all_of_a_500_event_pipeline_in_order(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    batch_sizes: list[int],
) -> None:
    settings = make_settings(**redis_target.settings, demo_runs=False, listener_queue_size=1000)
    client: AppClient = await start_client(settings)
    response = await client.get("/sse/connect", params={"sessionId": "piped"})
    await response.content.readuntil(STREAM_OPENED)
    channel = Keys().channel("piped")
    command = "SPUBLISH" if redis_target.cluster else "PUBLISH"
    node = await node_client_for(redis_target, channel)
    try:
        async with node.pipeline(transaction=False) as pipe:
            for n in range(1, 501):
                pipe.execute_command(command, channel, f"{n}-0\n\nevent {n}\r\nline two")
            pipe.execute_command(command, channel, "501-0\nfinish\nend")
            assert await pipe.execute() == [1] * 501
    finally:
        await node.aclose()
    events = await collect(response, timeout_s=10)
    assert [e.id for e in events] == [f"{n}-0" for n in range(1, 502)]
    assert [e.data for e in events[:-1]] == [f"event {n}\nline two" for n in range(1, 501)]
    assert events[-1].event == "finish"
    assert max(batch_sizes) > 10
    assert client.app[hub_key].stats.slow_listeners_dropped == 0


async def test_the_in_process_stand_in_is_read_one_reply_at_a_time(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    batch_sizes: list[int],
) -> None:
    client: AppClient = await start_client(make_settings(demo_runs=False), fake_opener)
    response = await client.get("/sse/connect", params={"sessionId": "fake"})
    await response.content.readuntil(STREAM_OPENED)
    publisher = client.app[publisher_key]
    for n in range(30):
        await publisher.publish("fake", "", f"m{n}")
    await publisher.publish("fake", "finish", "end")
    events = await collect(response, timeout_s=5)
    assert [e.data for e in events] == [f"m{n}" for n in range(30)] + ["end"]
    assert batch_sizes == []  # no socket: the hiredis batch reader is not used
