"""Redis Cluster specifics: a session's channel follows its slot when the slot moves."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from service.keys import Keys
from service.publisher import Publisher
from service.redis.connections import closed_under_us, open_redis
from service.redis.topology import subscriber_count
from service.resources import hub_key

from app_clients import MakeSettings, StartClient
from redis_process import RedisClusterProcesses
from redis_state import shard_of
from sse_reader import STREAM_OPENED, collect
from waiting import wait_for

pytestmark = pytest.mark.redis


async def node_id(client: RedisCluster, node: ClusterNode) -> str:
    reply = await client.execute_command("CLUSTER", "MYID", target_nodes=node)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def move_slot(
    client: RedisCluster, slot: int, source: ClusterNode, target: ClusterNode
) -> None:
    """Migrate one hash slot with its keys, the way redis-cli --cluster reshard does."""
    source_id, target_id = await node_id(client, source), await node_id(client, target)
    await client.execute_command(
        "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id, target_nodes=target
    )
    await client.execute_command(
        "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id, target_nodes=source
    )
    while keys := await client.execute_command(
        "CLUSTER", "GETKEYSINSLOT", slot, 100, target_nodes=source
    ):
        await client.execute_command(
            "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys, target_nodes=source
        )
    for node in client.get_primaries():
        await client.execute_command(
            "CLUSTER", "SETSLOT", slot, "NODE", target_id, target_nodes=node
        )


async def test_a_stream_keeps_receiving_when_its_slot_moves_to_another_shard(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_cluster: RedisClusterProcesses,
) -> None:
    cluster_client = RedisCluster.from_url(redis_cluster.url)
    try:
        await cluster_client.initialize()
        await cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
        settings = make_settings(
            redis_url=redis_cluster.url, redis_cluster=True, demo_runs=False, producer="off"
        )
        client = await start_client(settings)
        hub = client.app[hub_key]
        response = await client.get("/sse/connect", params={"sessionId": "moving"})
        reading = asyncio.create_task(collect(response, timeout_s=20))
        channel = Keys().channel("moving")
        publisher = Publisher(cluster_client, Keys(), session_ttl_s=60, log_maxlen=100)
        await publisher.publish("moving", "", "before")

        slot = cluster_client.keyslot(channel)
        source = shard_of(cluster_client, channel)
        target = next(n for n in cluster_client.get_primaries() if n.name != source.name)
        await move_slot(cluster_client, slot, source, target)
        await cluster_client.nodes_manager.initialize()
        assert shard_of(cluster_client, channel).name == target.name

        async def resubscribed_on_target() -> bool:
            return await subscriber_count(cluster_client, channel) == 1

        await wait_for(resubscribed_on_target, timeout_s=10, interval_s=0.05)
        await publisher.publish("moving", "", "after")
        await publisher.publish("moving", "finish", "end")
        events = await reading
        assert [(e.event, e.data) for e in events] == [
            ("message", "before"),
            ("message", "after"),
            ("finish", "end"),
        ]
        assert hub.connected
    finally:
        await cluster_client.aclose()


SESSIONS_PER_SHARD = 20
PUBLISH_TOKEN = "cluster-publisher-token-0123456789"


def sessions_on_every_shard(client: RedisCluster, per_shard: int) -> dict[str, list[str]]:
    """Session ids grouped by the primary that owns their channel, `per_shard` on each."""
    by_node: dict[str, list[str]] = {node.name: [] for node in client.get_primaries()}
    n = 0
    while any(len(ids) < per_shard for ids in by_node.values()):
        session_id = f"shard-{n}"
        n += 1
        ids = by_node[shard_of(client, Keys().channel(session_id)).name]
        if len(ids) < per_shard:
            ids.append(session_id)
    return by_node


async def test_killed_pubsub_connections_on_every_shard_resubscribe_every_stream(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_cluster: RedisClusterProcesses,
) -> None:
    cluster_client = RedisCluster.from_url(redis_cluster.url)
    try:
        await cluster_client.initialize()
        await cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
        by_node = sessions_on_every_shard(cluster_client, SESSIONS_PER_SHARD)
        session_ids = [sid for ids in by_node.values() for sid in ids]
        # The embedded producer keeps its wake-up channel on one of the links as well.
        settings = make_settings(
            redis_url=redis_cluster.url,
            redis_cluster=True,
            demo_runs=False,
            heartbeat_interval_s=0.5,
        )
        client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
        hub = client.app[hub_key]
        responses = [
            await client.get("/sse/connect", params={"sessionId": sid}) for sid in session_ids
        ]
        for response in responses:
            assert response.status == 200
            await response.content.readuntil(STREAM_OPENED)
        readers = [asyncio.create_task(collect(r, timeout_s=40)) for r in responses]
        publisher = Publisher(cluster_client, Keys(), session_ttl_s=60, log_maxlen=100)
        rounds = 6

        async def publish_round(k: int) -> None:
            for sid in session_ids:
                await publisher.publish(sid, "finish" if k == rounds - 1 else "", f"e{k}")

        for k in range(rounds // 2):
            await publish_round(k)
        for node in cluster_client.get_primaries():
            killed = await cluster_client.execute_command(
                "CLIENT", "KILL", "TYPE", "pubsub", target_nodes=node
            )
            assert int(killed) == 1, node.name
        for k in range(rounds // 2, rounds):
            await publish_round(k)
        results = await asyncio.gather(*readers)
        for sid, events in zip(session_ids, results, strict=True):
            assert [e.data for e in events] == [f"e{k}" for k in range(rounds)], sid
            assert [e.id for e in events] == sorted({e.id for e in events}), sid
        assert hub.connected
        assert hub.stats.reconnects >= len(by_node)
        assert (await client.get("/readyz")).status == 200
    finally:
        await cluster_client.aclose()


async def test_commands_cut_off_by_a_client_reset_fail_as_redis_errors(
    make_settings: MakeSettings,
    redis_cluster: RedisClusterProcesses,
) -> None:
    # redis-py resets its whole cluster client when a node answers CLUSTERDOWN, also closing
    # the connections of commands in flight; each of those must fail as a Redis error (the
    # API answers 503), not escape as an AttributeError or RuntimeError (a 500).
    client = await open_redis(make_settings(redis_url=redis_cluster.url, redis_cluster=True))
    outcomes: Counter[str] = Counter()
    resetting = True

    async def commands(worker: int) -> None:
        n = 0
        while resetting:
            n += 1
            try:
                await client.set(f"reset:{worker}:{n}", "v")
                outcomes["ok"] += 1
            except RedisError:
                outcomes["redis error"] += 1

    tasks = [asyncio.create_task(commands(worker)) for worker in range(20)]
    try:
        for _ in range(200):
            await asyncio.sleep(0.005)  # the pace of the resets, not a synchronisation
            await client.aclose()
    finally:
        resetting = False
        ended = await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
    assert [repr(error) for error in ended if error is not None] == []
    assert outcomes["ok"] > 0


async def test_commands_whose_idle_connection_is_closed_under_them_fail_as_redis_errors(
    make_settings: MakeSettings,
    redis_cluster: RedisClusterProcesses,
) -> None:
    # After a connection error or a slot-table refresh (a failover), redis-py closes each
    # node's idle connections while a command may just have taken one; that command must
    # fail as a Redis error (503), never as an AttributeError or RuntimeError (a 500).
    client = await open_redis(make_settings(redis_url=redis_cluster.url, redis_cluster=True))
    assert isinstance(client, RedisCluster)
    outcomes: Counter[str] = Counter()
    closing = True

    async def commands(worker: int) -> None:
        n = 0
        while closing:
            n += 1
            try:
                await client.set(f"idle:{worker}:{n}", "v")
                assert await client.exists(f"idle:{worker}:{n}", f"idle:{worker}:none") == 1
                outcomes["ok"] += 1
            except RedisError:
                outcomes["redis error"] += 1

    tasks = [asyncio.create_task(commands(worker)) for worker in range(20)]
    try:
        for _ in range(300):
            await asyncio.sleep(0.003)  # the pace of the closes, not a synchronisation
            for node in client.get_nodes():
                await node.disconnect_free_connections()
    finally:
        closing = False
        ended = await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
    assert [repr(error) for error in ended if error is not None] == []
    assert outcomes["ok"] > 0


async def test_only_a_failure_in_redis_connection_code_on_a_closed_socket_is_a_lost_one() -> None:
    connection = Connection(host="127.0.0.1", port=1)  # never connected: no writer
    with pytest.raises(AttributeError) as closed:
        await connection._send_packed_command([b"PING\r\n"])
    assert closed_under_us(closed.value)
    writer = None
    with pytest.raises(AttributeError) as ours:
        writer.writelines([])  # type: ignore[attr-defined]  # the same failure, in our code
    assert not closed_under_us(ours.value)
    with pytest.raises(AttributeError) as other:
        object().missing  # type: ignore[attr-defined]  # noqa: B018
    assert not closed_under_us(other.value)


async def pause_every_node(client: RedisCluster, seconds: float) -> float:
    """CLIENT PAUSE ALL on every node of the cluster; when the pause ends (monotonic)."""
    started = asyncio.get_running_loop().time()
    for node in client.get_nodes():
        await client.execute_command(
            "CLIENT", "PAUSE", round(seconds * 1000), "ALL", target_nodes=node
        )
    return started + seconds


async def test_commands_while_no_node_answers_fail_as_redis_errors(
    make_settings: MakeSettings,
    redis_cluster: RedisClusterProcesses,
) -> None:
    # A command that times out makes redis-py re-read the slot table, and when no node
    # answers that either, it raises RedisClusterException, which is not a RedisError:
    # callers that answer Redis outages (503, a postponed resync) would miss it.
    client = await open_redis(
        make_settings(redis_url=redis_cluster.url, redis_cluster=True, redis_timeout_s=0.3)
    )
    admin = RedisCluster.from_url(redis_cluster.url)
    try:
        await admin.initialize()
        unpaused = await pause_every_node(admin, 2.0)
        with pytest.raises(RedisError):
            await client.get("paused:key")
        assert asyncio.get_running_loop().time() < unpaused, "the pause ended too soon"
        await asyncio.sleep(max(0.0, unpaused - asyncio.get_running_loop().time()) + 0.1)
        await client.set("paused:key", "v")  # the client recovers on its own
        assert await client.get("paused:key") == b"v"
    finally:
        await admin.aclose()
        await client.aclose()


async def test_a_pause_of_every_node_longer_than_the_timeout_leaves_streams_going(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_cluster: RedisClusterProcesses,
) -> None:
    # The pub/sub links notice the silence, and the hub asks the cluster whether their
    # slots moved while no node answers: that must count as "not known yet", never end
    # the hub (every stream cut, every later connect refused until the worker restarts).
    admin = RedisCluster.from_url(redis_cluster.url)
    try:
        await admin.initialize()
        await admin.flushall(target_nodes=RedisCluster.PRIMARIES)
        settings = make_settings(
            redis_url=redis_cluster.url,
            redis_cluster=True,
            demo_runs=False,
            producer="off",
            redis_timeout_s=0.3,
            heartbeat_interval_s=0.5,
            publish_tokens=[PUBLISH_TOKEN],
        )
        client = await start_client(settings)
        hub = client.app[hub_key]
        by_node = sessions_on_every_shard(admin, 1)
        session_ids = [ids[0] for ids in by_node.values()]
        responses = [
            await client.get("/sse/connect", params={"sessionId": sid}) for sid in session_ids
        ]
        for response in responses:
            assert response.status == 200
            await response.content.readuntil(STREAM_OPENED)
        readers = [asyncio.create_task(collect(r, timeout_s=30)) for r in responses]
        publisher = Publisher(admin, Keys(), session_ttl_s=60, log_maxlen=100)
        for sid in session_ids:
            await publisher.publish(sid, "", "before")

        unpaused = await pause_every_node(admin, 3.0)
        # Each link pings after 0.3 s of silence and gives up 0.3 s later; then every
        # slot-table read times out too, well inside the pause. Meanwhile a new connect and
        # a publish are told to come back (503), never answered with a 500.
        await asyncio.sleep(1.0)
        answers = [
            await client.get("/sse/connect", params={"sessionId": "during-the-pause"}),
            await client.post(
                "/sse/sessions/during-the-pause/events",
                json={"data": "x"},
                headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
            ),
        ]
        assert asyncio.get_running_loop().time() < unpaused, "the pause ended too soon"
        for answer in answers:
            assert answer.status == 503, await answer.text()
            assert (await answer.json())["error"], answer.url
        await asyncio.sleep(max(0.0, unpaused - asyncio.get_running_loop().time()) + 0.1)

        async def links_back() -> bool:
            return hub.connected

        await wait_for(links_back, timeout_s=10, interval_s=0.05)
        for sid in session_ids:
            await publisher.publish(sid, "", "after")
            await publisher.publish(sid, "finish", "end")
        results = await asyncio.gather(*readers)
        for sid, events in zip(session_ids, results, strict=True):
            assert [(e.event, e.data) for e in events] == [
                ("message", "before"),
                ("message", "after"),
                ("finish", "end"),
            ], sid
        assert hub.connected
        assert hub.stats.reconnects >= 1

        async def ready() -> bool:  # once a delivery check passes again
            return (await client.get("/readyz")).status == 200

        await wait_for(ready, timeout_s=10, interval_s=0.1)
    finally:
        await admin.aclose()
