"""Which Redis node carries a pub/sub channel: the one server, the primary the Sentinels name,
or the cluster shard of the channel's slot.

redis-py's asyncio cluster client routes commands but the hub needs raw connections it can
drive itself (see pubsub_link), one per shard that owns a channel in use; this module
builds them from the client's own node table. Behind Sentinel the one connection comes from
the client's Sentinel-managed pool, so each reconnect asks the Sentinels where the primary is.
"""

from __future__ import annotations

from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from .connections import BlockingSentinelConnectionPool, cluster_unreachable_as_connection_error
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


class SentinelPrimary(SingleNode):
    """The primary a set of Redis Sentinels names; it changes when they fail it over.

    The connection comes from the client's Sentinel-managed pool: every (re)connect asks the
    Sentinels for the primary and checks the server's role (see connections). A connection
    that stays open to a server the Sentinels no longer name (demoted without its clients
    being killed, or cut off from the Sentinels) is found by `misplaced`.
    """

    watches_primary = True

    def __init__(self, client: Redis, pool: BlockingSentinelConnectionPool, drain_s: float) -> None:
        super().__init__(client)
        self._sentinel_pool = pool
        self._drain_s = drain_s

    async def misplaced(self, connection: Connection) -> str | None:
        """Why `connection` must move to the primary the Sentinels name now, or None.

        Before saying so it lets the commands already sent to the former primary be answered
        (at most `drain_s`): an event one of them publishes there reaches the streams only
        while the subscription is still there. A stream that got such an event, which the
        new primary never had, is then told of the gap when it replays from the new one.
        """
        # Also drops the pool's idle connections to a former primary.
        host, port = await self._sentinel_pool.get_master_address()  # type: ignore[no-untyped-call]
        here = (str(connection.host), int(connection.port))
        if here == (str(host), int(port)):
            return None
        await self._sentinel_pool.wait_for_commands_at(here, connection, self._drain_s)
        return f"the Sentinels name {host}:{port} as primary, not {here[0]}:{here[1]}"


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
        with cluster_unreachable_as_connection_error():
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


def topology_of(client: Redis | RedisCluster, drain_s: float = 2.0) -> Topology:
    """The topology matching the kind of client (`drain_s`: see SentinelPrimary.misplaced)."""
    if isinstance(client, RedisCluster):
        return ClusterShards(client)
    if isinstance(client.connection_pool, BlockingSentinelConnectionPool):
        return SentinelPrimary(client, client.connection_pool, drain_s)
    return SingleNode(client)
