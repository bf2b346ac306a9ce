"""Redis Cluster specifics: a session's channel follows its slot when the slot moves."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from service.keys import Keys
from service.publisher import Publisher
from service.resources import hub_key
from service.topology import subscriber_count

from conftest import MakeSettings, StartClient, wait_for
from redis_process import RedisClusterProcesses
from sse_reader import collect

pytestmark = pytest.mark.redis


async def node_id(client: RedisCluster, node: ClusterNode) -> str:
    reply = await client.execute_command("CLUSTER", "MYID", target_nodes=node)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def move_slot(client: RedisCluster, slot: int, source: ClusterNode,
                    target: ClusterNode) -> None:
    """Migrate one hash slot with its keys, the way redis-cli --cluster reshard does."""
    source_id, target_id = await node_id(client, source), await node_id(client, target)
    await client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id,
                                 target_nodes=target)
    await client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id,
                                 target_nodes=source)
    while keys := await client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100,
                                               target_nodes=source):
        await client.execute_command("MIGRATE", target.host, target.port, "", 0, 5000,
                                     "KEYS", *keys, target_nodes=source)
    for node in client.get_primaries():
        await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id,
                                     target_nodes=node)


async def test_a_stream_keeps_receiving_when_its_slot_moves_to_another_shard(
    start_client: StartClient, make_settings: MakeSettings, redis_cluster: RedisClusterProcesses,
) -> None:
    cluster_client = RedisCluster.from_url(redis_cluster.url)
    try:
        await cluster_client.initialize()
        await cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
        settings = make_settings(redis_url=redis_cluster.url, redis_cluster=True,
                                 demo_runs=False, producer="off")
        client = await start_client(settings)
        hub = client.server.app[hub_key]
        response = await client.get("/sse/connect", params={"sessionId": "moving"})
        reading = asyncio.create_task(collect(response, timeout_s=20))
        channel = Keys().channel("moving")
        publisher = Publisher(cluster_client, Keys(), session_ttl_s=60, log_maxlen=100)
        await publisher.publish("moving", "", "before")

        slot = cluster_client.keyslot(channel)
        source = cluster_client.get_node_from_key(channel)
        target = next(n for n in cluster_client.get_primaries() if n.name != source.name)
        await move_slot(cluster_client, slot, source, target)
        await cluster_client.nodes_manager.initialize()
        assert cluster_client.get_node_from_key(channel).name == target.name

        async def resubscribed_on_target() -> bool:
            return await subscriber_count(cluster_client, channel) == 1

        await wait_for(resubscribed_on_target, timeout_s=10, interval_s=0.05)
        await publisher.publish("moving", "", "after")
        await publisher.publish("moving", "finish", "end")
        events = await reading
        assert [(e.event, e.data) for e in events] == [
            ("message", "before"), ("message", "after"), ("finish", "end"),
        ]
        assert hub.connected
    finally:
        await cluster_client.aclose()
