"""Which Redis node carries a pub/sub channel: the one server, or the cluster shard of its slot.

redis-py's asyncio cluster client routes commands but the hub needs raw connections it can
drive itself (see pubsub_link), one per shard that owns a channel in use; this module
builds them from the client's own node table.
"""

from __future__ import annotations

from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from .pubsub_link import PLAIN, SHARDED, Dialect

SINGLE_NODE = "redis"


class Topology(Protocol):
    """Where channels live and how to open a connection there."""

    @property
    def dialect(self) -> Dialect:
        """Plain pub/sub on one server, sharded pub/sub on a cluster."""

    def node_for(self, channel: bytes) -> str:
        """The name of the node whose connection must carry `channel`."""

    async def open_connection(self, node: str) -> Connection:
        """A new, not yet connected, connection to `node`."""

    async def release(self, connection: Connection) -> None:
        """Give back a connection opened by `open_connection`."""

    async def refresh(self) -> None:
        """Re-read the slot table after the cluster moved a slot."""

    @property
    def watches_primary(self) -> bool:
        """Whether connections must be checked now and then with `misplaced`."""

    async def misplaced(self, connection: Connection) -> str | None:
        """Why `connection` no longer reaches the server its channels live on, or None."""


class SingleNode:
    """One Redis server: every channel on one connection taken from the client's pool."""

    dialect = PLAIN
    watches_primary = False

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool

    def node_for(self, channel: bytes) -> str:
        del channel
        return SINGLE_NODE

    async def open_connection(self, node: str) -> Connection:
        del node
        connection: Connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        return connection

    async def release(self, connection: Connection) -> None:
        await connection.disconnect()
        await self._pool.release(connection)

    async def refresh(self) -> None:
        """Nothing moves on a single server."""

    async def misplaced(self, connection: Connection) -> str | None:
        del connection
        return None


class ClusterShards:
    """A Redis Cluster: each channel on a connection to the primary owning its hash slot."""

    dialect = SHARDED

    watches_primary = False

    def __init__(self, client: RedisCluster) -> None:
        self._client = client

    def node_for(self, channel: bytes) -> str:
        node = self._client.get_node_from_key(channel.decode())
        if node is None:  # pragma: no cover - raises SlotNotCoveredError instead
            raise LookupError(f"no node serves channel {channel!r}")
        return node.name

    async def open_connection(self, node: str) -> Connection:
        cluster_node = self._client.get_node(node_name=node)
        if cluster_node is None:
            raise LookupError(f"unknown cluster node {node}")
        return cluster_node.connection_class(**cluster_node.connection_kwargs)

    async def release(self, connection: Connection) -> None:
        await connection.disconnect()

    async def refresh(self) -> None:
        await self._client.nodes_manager.initialize()

    async def misplaced(self, connection: Connection) -> str | None:
        """Moves show as MOVED replies and dropped channels; nothing to poll."""
        del connection
        return None


def publish_command(client: Redis | RedisCluster) -> str:
    """PUBLISH on one server; SPUBLISH on a cluster, so a message goes to one shard only."""
    return "SPUBLISH" if isinstance(client, RedisCluster) else "PUBLISH"


async def subscriber_count(client: Redis | RedisCluster, channel: str) -> int:
    """Connections subscribed to `channel`: PUBSUB NUMSUB, or SHARDNUMSUB on its shard."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # a no-op once the slot table is known
        node = client.get_node_from_key(channel)
        reply = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel, target_nodes=node)
    else:
        reply = await client.pubsub_numsub(channel)
    return _count_of(reply)


def _count_of(reply: Any) -> int:
    # redis-py parses NUMSUB into [(channel, n)]; SHARDNUMSUB arrives as [channel, n].
    first = reply[0]
    return int(first[1] if isinstance(first, list | tuple) else reply[1])


def topology_of(client: Redis | RedisCluster) -> Topology:
    """The topology matching the kind of client."""
    if isinstance(client, RedisCluster):
        return ClusterShards(client)
    return SingleNode(client)
