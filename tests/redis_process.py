"""Start and stop real `redis-server` processes on free loopback ports, by pid."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
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

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
    """A Redis Cluster of `size` primaries (no replicas) on free loopback ports."""

    binary: str
    workdir: Path
    size: int = 3
    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed node; the client discovers the rest."""
        return self.nodes[0].url

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is needed to create a cluster")
        for index in range(self.size):
            node = RedisProcess(
                self.binary, self.workdir / f"node{index}", port=free_cluster_port(),
                extra_args=("--cluster-enabled", "yes",
                            "--cluster-config-file", f"nodes-{index}.conf",
                            "--cluster-node-timeout", "2000"),
            )
            node.start()
            self.nodes.append(node)
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self._state_ok(cli, node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _state_ok(cli: str, port: int) -> bool:
        info = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"],
            check=False, capture_output=True, text=True, timeout=5,
        )
        return "cluster_state:ok" in info.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
