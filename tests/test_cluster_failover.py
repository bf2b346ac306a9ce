"""Redis Cluster failover under live streams: a primary is killed, its replica takes over.

The worker must notice the dead shard, re-read the slot table, subscribe its channels on the
promoted replica and replay what its streams missed; its own commands (attach, publish) must
follow the new owner too; `/readyz` must say it cannot deliver while the shard has no owner.
Events the old primary acknowledged but never replicated may be lost: a stream that misses
one must be told (`event: gap`) and go on. Silence, a duplicate or a hang fails the test.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from service.keys import Keys
from service.resources import hub_key

from app_clients import AppClient, MakeSettings, StartClient
from delivery_audit import (
    READY_AGAIN_S,
    DeliveryAudit,
    ReadinessLog,
    is_ready,
    wait_until_async,
)
from redis_process import (
    RedisClusterProcesses,
    RedisProcess,
    is_primary,
    require_redis_server,
    wait_until,
)
from redis_state import logged_ids, shard_of
from sse_reader import STREAM_OPENED, collect

pytestmark = [pytest.mark.redis, pytest.mark.ha]

TOKEN = "failover-test-token-0123456789"
SESSIONS_PER_SHARD = 10


@pytest.fixture
def cluster_with_replicas(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """Three primaries with a replica each; a silent primary is failed over in about 2 s."""
    cluster = RedisClusterProcesses(
        require_redis_server(), tmp_path / "cluster", replicas=1, node_timeout_ms=1000
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def sessions_by_shard(client: RedisCluster, per_shard: int, prefix: str) -> dict[str, list[str]]:
    """Session ids grouped by the primary owning their channel, `per_shard` on each."""
    by_node: dict[str, list[str]] = {node.name: [] for node in client.get_primaries()}
    n = 0
    while any(len(ids) < per_shard for ids in by_node.values()):
        session_id = f"{prefix}-{n}"
        n += 1
        ids = by_node[shard_of(client, Keys().channel(session_id)).name]
        if len(ids) < per_shard:
            ids.append(session_id)
    return by_node


async def test_a_killed_primary_fails_over_and_every_stream_resumes(
    start_client: StartClient,
    make_settings: MakeSettings,
    cluster_with_replicas: RedisClusterProcesses,
    record_property: Callable[[str, Any], None],
) -> None:
    cluster = cluster_with_replicas
    # The worker's seed node is the primary that dies: it must find the others on its own.
    victim = cluster.nodes[0]
    assert is_primary(victim.port)
    heir = cluster.replica_of(victim)
    admin = RedisCluster(host="127.0.0.1", port=heir.port)
    try:
        await admin.initialize()
        by_node = sessions_by_shard(admin, SESSIONS_PER_SHARD, "fo")
        victim_sessions = by_node[f"127.0.0.1:{victim.port}"]
        settings = make_settings(
            redis_url=victim.url, redis_cluster=True, demo_runs=False,
            publish_tokens=(TOKEN,), heartbeat_interval_s=0.5, redis_timeout_s=1.0,
            redis_max_connections=8,
        )  # fmt: skip
        client = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
        hub = client.app[hub_key]
        audit = DeliveryAudit(client, [sid for ids in by_node.values() for sid in ids], TOKEN)
        readiness = ReadinessLog(client)

        async def promoted() -> None:
            await asyncio.to_thread(
                wait_until, lambda: is_primary(heir.port), "the replica is promoted", 20.0
            )

        try:
            await audit.open()
            times = await audit.play(
                readiness,
                lambda: crash_with_unreplicated_writes(admin, cluster, victim, audit),
                promoted,
            )
        finally:
            await audit.close()
            await readiness.stop()
        report = audit.report("cluster: SIGKILL of a primary", times.fault_at)
        record_property("failover", f"{report.line()}; {times.recovered_line('promoted')}")
        report.assert_no_silence()
        await admin.nodes_manager.initialize()
        for session_id in victim_sessions:
            # Told of a gap exactly when the new primary's log lost events the stream had.
            kept = set(await logged_ids(admin, session_id))
            lost = [i for i in audit.received_ids(session_id) if i not in kept]
            assert audit.logs[session_id].told_of_gap == bool(lost), session_id
        # Readiness said so while the dead shard's channels had no reachable owner.
        assert readiness.unready_between(times.fault_at, times.resumed_at)
        # Ready again at the canary round after delivery resumed.
        await wait_until_async(lambda: is_ready(client), "ready again", READY_AGAIN_S)
        assert hub.connected
        assert hub.link_count == 3, "the dead primary's link is retired, one per live shard"
        await attach_and_publish_on(admin, client, f"127.0.0.1:{heir.port}")
    finally:
        await admin.aclose()


async def crash_with_unreplicated_writes(
    admin: RedisCluster,
    cluster: RedisClusterProcesses,
    victim: RedisProcess,
    audit: DeliveryAudit,
) -> float:
    """SIGKILL `victim` right after a round of events only it acknowledged; the kill's time.

    Its replica is frozen and its replication link cut, so that round is never replicated:
    the promoted replica's logs lack it, as after any crash that outruns async replication.
    """
    heir = cluster.replica_of(victim)
    assert heir.process is not None
    heir.process.send_signal(signal.SIGSTOP)
    try:
        victim_node = admin.get_node(host="127.0.0.1", port=victim.port)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "replica", target_nodes=victim_node)
        rounds = audit.rounds
        await wait_until_async(lambda: audit.rounds > rounds + 1, "an unreplicated round", 5)
        fault_at = time.monotonic()
        victim.kill()
    finally:
        heir.process.send_signal(signal.SIGCONT)
    return fault_at


async def attach_and_publish_on(admin: RedisCluster, client: AppClient, node: str) -> None:
    """A new session on `node`'s shard: the worker's attach and publish reach its new owner."""
    fresh = sessions_by_shard(admin, 1, "after")[node][0]
    response = await client.get("/sse/connect", params={"sessionId": fresh})
    assert response.status == 200
    await response.content.readuntil(STREAM_OPENED)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for body in ({"data": "x"}, {"event": "finish", "data": "x"}):
        published = await client.post(f"/sse/sessions/{fresh}/events", json=body, headers=auth)
        assert published.status == 202
    assert [e.event for e in await collect(response, timeout_s=10)] == ["message", "finish"]
