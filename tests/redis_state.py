"""Reading a Redis deployment's state in assertions: which deployment a test runs against, a
session's event log as written, the pub/sub connections open on the servers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from service.keys import Keys
from service.redis.connections import RedisClient

# One log entry as Redis returns it to a client without decode_responses: id, fields.
LogEntry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True)
class RedisTarget:
    """A real Redis deployment to run a test against: one server, or a cluster."""

    url: str
    cluster: bool

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that point a worker at it."""
        return {"redis_url": self.url, "redis_cluster": self.cluster}

    def client(self) -> RedisClient:
        """A plain client for assertions about its state."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)


async def log_entries(client: RedisClient, session_id: str, start: str = "-") -> list[LogEntry]:
    """A session's event log from `start` (an XRANGE min), oldest first, as Redis keeps it."""
    # redis-py types the reply for any client; ours return bytes (no decode_responses).
    entries: list[LogEntry] = await client.xrange(  # type: ignore[assignment]
        Keys().log(session_id), min=start
    )
    return entries


async def logged_ids(client: RedisClient, session_id: str) -> list[str]:
    """The ids in a session's event log, oldest first."""
    return [entry_id.decode() for entry_id, _ in await log_entries(client, session_id)]


async def logged_data(client: RedisClient, session_id: str) -> list[tuple[str, str]]:
    """The id and data of each event in a session's log, oldest first."""
    return [
        (entry_id.decode(), fields[b"d"].decode())
        for entry_id, fields in await log_entries(client, session_id)
    ]


def shard_of(client: RedisCluster, key: str) -> ClusterNode:
    """The primary that holds `key`'s slot, as the client's slot table says."""
    node = client.get_node_from_key(key)
    if node is None:
        raise AssertionError(f"no node holds the slot of {key!r}: slot table not loaded?")
    return node


async def pubsub_connections(client: RedisClient) -> int:
    """Pub/sub connections open on the server, or on all cluster primaries together."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        total = 0
        for node in client.get_primaries():
            listed = await client.execute_command(
                "CLIENT", "LIST", "TYPE", "pubsub", target_nodes=node
            )
            total += len([line for line in _lines(listed) if line])
        return total
    return len(await client.client_list(_type="pubsub"))


def _lines(listed: Any) -> list[str]:
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    return text.splitlines()
