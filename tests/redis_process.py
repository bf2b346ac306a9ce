"""Start and stop real `redis-server` and `redis-sentinel` processes on free loopback ports, by pid.

Besides one server: a Redis Cluster (optionally with a replica per primary, for failovers),
and one primary with one replica watched by three Sentinels. Every wait is bounded.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_SENTINEL = shutil.which("redis-sentinel")
# CI (and anyone setting SSE_REQUIRE_REDIS=1) must run every test: a missing tool fails.
REQUIRE_TOOLS = os.environ.get("SSE_REQUIRE_REDIS") == "1" or bool(os.environ.get("CI"))
START_TIMEOUT_S = 10.0


def require_tool(found: str | None, missing: str) -> str:
    """`found`; without it skip the test saying `missing`, or fail when tools are required."""
    if found is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{missing}, and SSE_REQUIRE_REDIS=1 or CI forbids skipping")
        pytest.skip(missing)
    return found


def require_redis_server() -> str:
    """The redis-server path (see require_tool)."""
    missing = "redis-server is not installed (apt-get install redis-server)"
    return require_tool(REDIS_SERVER, missing)


def require_redis_sentinel() -> str:
    """The redis-sentinel path (see require_tool)."""
    missing = "redis-sentinel is not installed (apt-get install redis-sentinel)"
    return require_tool(REDIS_SENTINEL, missing)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll `condition` until it holds; RuntimeError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting until {what}")
        time.sleep(0.05)


def role_of(port: int) -> list[Any]:
    """The reply of ROLE on the server at `port`; [] when it does not answer."""
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
            reply: list[Any] = client.execute_command("ROLE")
            return reply
    except redis.RedisError:
        return []


def is_primary(port: int) -> bool:
    """The server at `port` answers and is a primary."""
    return role_of(port)[:1] == [b"master"]


def replica_linked_to(port: int) -> int | None:
    """The port of the primary the replica at `port` replicates from, once linked; else None."""
    role = role_of(port)
    if role[:1] == [b"slave"] and role[3] == b"connected":
        return int(role[2])
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, both below 65536."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if _can_bind(port) and _can_bind(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class RedisProcess:
    """One redis-server child process; `stop` and `start` again on the same port."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        # A replica's first sync starts at once, not after the default 5 s wait for others.
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            str(self.workdir),
            *self.extra_args,
        ]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    # NOAUTH: a server started with --requirepass answers too.
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None


@dataclass
class RedisClusterProcesses:
    """A Redis Cluster of `size` primaries, each with `replicas` replicas, on loopback ports.

    `node_timeout_ms` is how long a silent primary takes to be failed over by its replica
    (Redis's cluster-node-timeout; seconds in production, about one here).
    """

    binary: str
    workdir: Path
    size: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed node; the client discovers the rest."""
        return self.nodes[0].url

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is needed to create a cluster")
        for index in range(self.size * (1 + self.replicas)):
            node = RedisProcess(
                self.binary,
                self.workdir / f"node{index}",
                port=free_cluster_port(),
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{index}.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                ),
            )
            node.start()
            self.nodes.append(node)
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_until(
            lambda: all(self._state_ok(cli, node.port) for node in self.nodes),
            "the cluster reaches cluster_state:ok",
            START_TIMEOUT_S,
        )
        wait_until(
            lambda: len(self.replicas_of_primaries()) == self.size * self.replicas,
            "every replica is linked to its primary",
            START_TIMEOUT_S,
        )

    @staticmethod
    def _state_ok(cli: str, port: int) -> bool:
        info = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return "cluster_state:ok" in info.stdout

    def node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def replicas_of_primaries(self) -> dict[int, int]:
        """Linked replicas: replica port -> the port of the primary it follows."""
        links = {node.port: replica_linked_to(node.port) for node in self.nodes if node.process}
        return {replica: primary for replica, primary in links.items() if primary is not None}

    def replica_of(self, primary: RedisProcess) -> RedisProcess:
        """A replica linked to `primary`."""
        replicas = self.replicas_of_primaries()
        return self.node(next(r for r, p in replicas.items() if p == primary.port))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()


@dataclass
class SentinelProcess(RedisProcess):
    """One redis-sentinel child process, watching `service_name` from its own config file."""

    service_name: str = "mymaster"
    primary_port: int = 0
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    # Sentinel directives to use instead of the ones above (e.g. a deployment's own).
    directives: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        # Sentinel rewrites its config file as it learns, so it lives in its own directory.
        config = self.workdir / "sentinel.conf"
        name = self.service_name
        directives = self.directives or (
            f"sentinel monitor {name} 127.0.0.1 {self.primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        )
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            + "".join(f"{line}\n" for line in directives)
        )
        return [self.binary, str(config)]

    def primary_port_now(self) -> int | None:
        """The port of the primary this Sentinel names now, or None if it does not answer."""
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as client:
                address = client.sentinel_get_master_addr_by_name(self.service_name)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def sees(self, replicas: int, other_sentinels: int) -> bool:
        """This Sentinel has found that many replicas and other Sentinels."""
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as client:
                state = client.sentinel_master(self.service_name)
        except redis.RedisError:
            return False
        return bool(
            state["num-slaves"] == replicas and state["num-other-sentinels"] == other_sentinels
        )


@dataclass
class RedisSentinelProcesses:
    """One primary, one replica and three Sentinels watching them, on free loopback ports.

    Sentinel times are small (a primary silent for `down_after_ms` is failed over) so a
    failover takes a few seconds.
    """

    binary: str
    sentinel_binary: str
    workdir: Path
    service_name: str = "mymaster"
    down_after_ms: int = 1000
    servers: list[RedisProcess] = field(default_factory=list)
    sentinels: list[SentinelProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The `redis+sentinel://` URL naming all three Sentinels."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service_name}/0"

    def start(self) -> None:
        primary = RedisProcess(self.binary, self.workdir / "server0")
        primary.start()
        self.servers.append(primary)
        replica = RedisProcess(
            self.binary,
            self.workdir / "server1",
            extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
        )
        replica.start()
        self.servers.append(replica)
        wait_until(
            lambda: replica_linked_to(replica.port) == primary.port,
            "the replica is linked to the primary",
            START_TIMEOUT_S,
        )
        for index in range(3):
            sentinel = SentinelProcess(
                self.sentinel_binary,
                self.workdir / f"sentinel{index}",
                service_name=self.service_name,
                primary_port=primary.port,
                down_after_ms=self.down_after_ms,
            )
            sentinel.start()
            self.sentinels.append(sentinel)
        wait_until(
            lambda: all(s.sees(replicas=1, other_sentinels=2) for s in self.sentinels),
            "every Sentinel knows the replica and the other Sentinels",
            20.0,
        )

    def primary(self) -> RedisProcess:
        """The server every Sentinel names as primary now."""
        ports = {sentinel.primary_port_now() for sentinel in self.sentinels}
        if len(ports) != 1 or None in ports:
            raise RuntimeError(f"the Sentinels disagree on the primary: {ports}")
        port = ports.pop()
        return next(server for server in self.servers if server.port == port)

    def replica(self) -> RedisProcess:
        """The running server that is not the primary."""
        primary = self.primary()
        return next(s for s in self.servers if s is not primary and s.process is not None)

    def wait_for_primary(self, server: RedisProcess, timeout_s: float = 20.0) -> None:
        """Until every Sentinel names `server` as primary and it says it is one."""
        wait_until(
            lambda: (
                all(s.primary_port_now() == server.port for s in self.sentinels)
                and is_primary(server.port)
            ),
            f"the Sentinels fail over to port {server.port}",
            timeout_s,
        )

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()
        self.sentinels.clear()
        self.servers.clear()
