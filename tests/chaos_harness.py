"""Fault injection against real processes: Redis (one server or a cluster), workers, producers.

A `Lab` starts redis-server, workers as `python -m service`, separate producers and nginx,
and stops every one of them when the test ends, also when it fails. A `Deployment` injects
Redis faults (SIGKILL and restart with or without its data, a busy script, CLIENT PAUSE,
killed pub/sub connections). A `Workload` runs EventSource clients on demo runs and on
API-fed sessions while readiness probes watch the workers, then counts what each got.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from service.keys import Keys

from event_source import TOKEN
from redis_process import RedisClusterProcesses, RedisProcess, free_port
from stack_processes import Child, Worker, local_nginx_conf, nginx_argv, service_env

KEYS = Keys()
# Worker settings sized so that a run lasts about two seconds and every fault in seconds.
WORKER_SETTINGS: dict[str, object] = {
    "producer_interval_ms": 200,
    "producer_poll_ms": 200,
    "producer_lease_ms": 1500,
    "producer_event_count": 10,
    "retry_ms": 200,
    "heartbeat_interval_s": 1.0,
    "session_ttl_s": 120,  # longer than any test: the logs are read when it ends
    "redis_timeout_s": 1.0,
    "drain_timeout_s": 5,
    "publish_tokens": TOKEN,
    "log_level": "INFO",
    # Every simulated client connects from 127.0.0.1, which the per-address limits on new
    # sessions and demo runs would count as one client (tests/test_rate_limit.py).
    "session_rate_per_s": 0,
    "run_rate_per_s": 0,
}
EVENTS_PER_RUN = 10
START_TIMEOUT_S = 20.0
# Redis writes the append-only file before it answers, so SIGKILL loses nothing written.
PERSISTENT_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec")
BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  local now = redis.call('TIME')
  if now[1] * 1000000 + now[2] - start > tonumber(ARGV[1]) * 1000 then return 1 end
end
"""


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


# --- Redis: one server or a cluster, and the faults injected into it ---


@dataclass
class Deployment:
    """The Redis a stack runs on: one server, or the primaries of a cluster."""

    nodes: list[RedisProcess]
    cluster: bool

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def settings(self) -> dict[str, object]:
        return {"redis_url": self.url, "redis_cluster": self.cluster}

    def client(self) -> redis.Redis | RedisCluster:
        """A client for assertions about the deployment's state."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)

    async def on_each_node(self, *command: object, timeout_s: float = 10.0) -> list[Any]:
        """Run `command` on every node at once, each on a connection of its own."""

        async def run(node: RedisProcess) -> Any:
            client = redis.Redis.from_url(node.url, socket_timeout=timeout_s)
            try:
                return await client.execute_command(*command)
            finally:
                await client.aclose()

        return list(await asyncio.gather(*(run(node) for node in self.nodes)))

    async def flush(self) -> None:
        await self.on_each_node("FLUSHALL")

    async def persist(self) -> None:
        """Turn on the append-only file now and for every later restart."""
        await self.on_each_node("CONFIG", "SET", "appendonly", "yes", "appendfsync", "everysec")
        for node in self.nodes:
            node.extra_args = (*node.extra_args, *PERSISTENT_ARGS)

        async def written() -> bool:
            infos = await self.on_each_node("INFO", "persistence")
            return all(
                info["aof_enabled"] == 1 and info["aof_rewrite_in_progress"] == 0 for info in infos
            )

        await wait_until(written, 10, "the append-only files")

    async def stall(self, seconds: float) -> float:
        """Keep every node busy in a script for `seconds`: alive, but answering nothing.

        Returns when the first node answered again (monotonic clock): no worker could reach
        any node before it.
        """
        first_back: list[float] = []

        async def busy(node: RedisProcess) -> None:
            client = redis.Redis.from_url(node.url, socket_timeout=seconds + 10)
            try:
                await client.execute_command("EVAL", BUSY_SCRIPT, 0, round(seconds * 1000))
                first_back.append(time.monotonic())
            finally:
                await client.aclose()

        await asyncio.gather(*(busy(node) for node in self.nodes))
        return min(first_back)

    async def pause(self, seconds: float) -> float:
        """CLIENT PAUSE ALL on every node for `seconds`; the earliest it can end (monotonic)."""
        sent = time.monotonic()
        await self.on_each_node("CLIENT", "PAUSE", round(seconds * 1000), "ALL")
        return sent + seconds

    async def kill_pubsub(self) -> int:
        """CLIENT KILL TYPE pubsub on every node; the number of connections cut."""
        return sum(int(n) for n in await self.on_each_node("CLIENT", "KILL", "TYPE", "pubsub"))

    async def kill_and_restart(
        self, nodes: Sequence[RedisProcess], *, keep_data: bool, down_s: float
    ) -> float:
        """SIGKILL `nodes`, keep them down `down_s`, start them again on the same ports.

        Without `keep_data` their data files go (a cluster node keeps its nodes.conf: it comes
        back as the same, empty, member). Returns when the restart began (monotonic): the
        nodes were surely down until then.
        """
        for node in nodes:
            node.kill()
            if not keep_data:
                shutil.rmtree(node.workdir / "appendonlydir", ignore_errors=True)
                (node.workdir / "dump.rdb").unlink(missing_ok=True)
        await asyncio.sleep(down_s)  # the outage the fault prescribes
        restarting = time.monotonic()
        for node in nodes:
            await asyncio.to_thread(node.start)
        if self.cluster:
            await wait_until(self._cluster_ok, 20, "cluster_state:ok after the restart")
        return restarting

    async def _cluster_ok(self) -> bool:
        try:
            infos = await self.on_each_node("CLUSTER", "INFO", timeout_s=1)
        except redis.RedisError:
            return False
        return all(b"cluster_state:ok" in _bytes(info) for info in infos)

    async def node_of(self, session_id: str) -> RedisProcess:
        """The node holding the session's keys."""
        return await self.node_of_key(KEYS.session(session_id))

    async def node_of_key(self, key: str) -> RedisProcess:
        """The node holding `key`."""
        if not self.cluster:
            return self.nodes[0]
        slot = key_slot(key.encode())
        for first, last, port in await self._slot_ranges():
            if first <= slot <= last:
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node owns slot {slot}")

    async def _slot_ranges(self) -> list[tuple[int, int, int]]:
        client = redis.Redis.from_url(self.url)
        try:
            slots = await client.execute_command("CLUSTER", "SLOTS")
        finally:
            await client.aclose()
        if isinstance(slots, dict):  # redis-py parses the reply into {(first, last): {...}}
            return [(first, last, int(info["primary"][1])) for (first, last), info in slots.items()]
        return [(int(s[0]), int(s[1]), int(s[2][1])) for s in slots]


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


# --- The service's processes ---


@dataclass
class ChaosStack:
    """Workers (with or without their embedded producer), separate producers, maybe nginx."""

    deployment: Deployment
    workdir: Path
    workers: int = 1
    embedded_producer: bool = True
    producers: int = 0
    nginx_binary: str | None = None
    settings: dict[str, object] = field(default_factory=dict)
    roles: list[dict[str, object]] = field(default_factory=list)  # per-worker overrides
    worker_processes: list[Worker] = field(default_factory=list)
    producer_processes: list[Child] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    nginx_port: int = 0

    @property
    def common(self) -> dict[str, object]:
        return {**WORKER_SETTINGS, **self.deployment.settings, **self.settings}

    @property
    def url(self) -> str:
        """Where clients connect: nginx if there is one, else the first worker."""
        if self.nginx_port:
            return f"http://127.0.0.1:{self.nginx_port}"
        return self.worker_processes[0].url

    def client_urls(self) -> list[str]:
        """The URL of each worker, or nginx's alone: clients spread over them."""
        if self.nginx_port:
            return [self.url]
        return [worker.url for worker in self.worker_processes]

    async def start(self) -> None:
        producer = "embedded" if self.embedded_producer else "off"
        for n in range(self.workers):
            port = free_port()
            role = self.roles[n] if n < len(self.roles) else {}
            env = service_env(
                **{**self.common, "host": "127.0.0.1", "port": port, "producer": producer, **role}
            )
            worker = Worker(
                f"worker{n}",
                [sys.executable, "-m", "service", "serve"],
                env,
                self.workdir / f"worker{n}.log",
                port=port,
            )
            self.worker_processes.append(worker)
            self.children.append(worker)
            worker.start()
        for _ in range(self.producers):
            self.add_producer()
        if self.nginx_binary is not None:
            self._start_nginx(self.nginx_binary)
        for worker in self.worker_processes:
            await self._wait_ready(worker, f"{worker.url}/readyz")
        for child in self.producer_processes:
            await self._wait_producer(child)
        if self.nginx_port:
            await self._wait_ready(self.children[-1], f"{self.url}/healthz")

    def add_producer(self) -> Child:
        """Start one more separate producer process (wait for it with `wait_producer`)."""
        n = len(self.producer_processes)
        child = Child(
            f"producer{n}",
            [sys.executable, "-m", "service", "producer"],
            service_env(**self.common),
            self.workdir / f"producer{n}.log",
        )
        self.producer_processes.append(child)
        self.children.append(child)
        child.start()
        return child

    async def _wait_producer(self, child: Child) -> None:
        await wait_until(
            lambda: _running_or_fail(child) and "producer running" in child.log_text(),
            START_TIMEOUT_S,
            f"{child.name} to run",
        )

    wait_producer = _wait_producer

    def _start_nginx(self, binary: str) -> None:
        self.nginx_port = free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        conf = local_nginx_conf([w.port for w in self.worker_processes], self.nginx_port)
        (prefix / "nginx.conf").write_text(conf)
        nginx = Child(
            "nginx",
            nginx_argv(binary, prefix, directives="daemon off;"),
            dict(os.environ),
            self.workdir / "nginx.log",
        )
        self.children.append(nginx)
        nginx.start()

    async def _wait_ready(self, child: Child, url: str) -> None:
        async with aiohttp.ClientSession() as http:

            async def answers() -> bool:
                _running_or_fail(child)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                        return response.status == 200
                return False

            await wait_until(answers, START_TIMEOUT_S, f"{child.name} to be ready")

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.log_text()[-6000:]}" for c in self.children)


def _running_or_fail(child: Child) -> bool:
    if not child.running:
        raise AssertionError(f"{child.name} exited:\n{child.log_text()[-3000:]}")
    return True


def rss_bytes(child: Child) -> int:
    """The process's resident memory, from /proc."""
    assert child.process is not None
    status = Path(f"/proc/{child.process.pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(line.split()[1]) * 1024


async def metric(http: aiohttp.ClientSession, worker: Worker, name: str) -> float:
    """One unlabelled value from the worker's /metrics."""
    async with http.get(f"{worker.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(
        f"{name} not in /metrics of {worker.name} ({response.status}): {text[:300]!r}"
    )


async def idle_state(http: aiohttp.ClientSession, worker: Worker) -> tuple[float, float]:
    """Open streams and subscribed channels (an embedded producer holds one of its own)."""
    return (
        await metric(http, worker, "sse_open_streams"),
        await metric(http, worker, "sse_hub_channels"),
    )


# Worker roles: one runs demo runs with its embedded producer, one serves the publish API.
DEMO_ROLE: dict[str, object] = {"producer": "embedded", "demo_runs": True}
API_ROLE: dict[str, object] = {"producer": "off", "demo_runs": False}


@dataclass
class Lab:
    """Owns every process and connection a chaos test starts, and stops them all."""

    workdir: Path
    redis_binary: str
    servers: list[RedisProcess] = field(default_factory=list)
    clusters: list[RedisClusterProcesses] = field(default_factory=list)
    stacks: list[ChaosStack] = field(default_factory=list)
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    async def single(self) -> Deployment:
        """A redis-server of this test's own."""
        server = RedisProcess(self.redis_binary, self.workdir / f"redis{len(self.servers)}")
        self.servers.append(server)
        await asyncio.to_thread(server.start)
        return Deployment([server], cluster=False)

    async def cluster(self) -> Deployment:
        """A three-primary cluster of this test's own."""
        cluster = RedisClusterProcesses(
            self.redis_binary, self.workdir / f"cluster{len(self.clusters)}"
        )
        self.clusters.append(cluster)
        await asyncio.to_thread(cluster.start)
        return Deployment(cluster.nodes, cluster=True)

    async def stack(self, deployment: Deployment, **options: Any) -> ChaosStack:
        stack = ChaosStack(deployment, self.workdir / f"stack{len(self.stacks)}", **options)
        stack.workdir.mkdir()
        self.stacks.append(stack)
        await stack.start()
        return stack

    def http(self, **timeouts: float) -> aiohttp.ClientSession:
        """A client session without a connection limit, closed with the lab."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, connect=10, **timeouts)
        session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=False)
        )
        self.sessions.append(session)
        return session

    def logs(self) -> str:
        return "\n".join(stack.logs() for stack in self.stacks)

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        for stack in self.stacks:
            stack.stop()
        for cluster in self.clusters:
            cluster.stop()
        for server in self.servers:
            server.stop()
