"""The processes a run measures: its own redis-server, the worker under test, the baseline.

Each target runs in its own process, apart from the load generator, so the generator's
work never counts against the worker; the worker's memory and CPU are read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis

from .sse_client import fetch

START_TIMEOUT_S = 20.0
BENCH_CLIENT_NAME = "bench"
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "sse-fanout"
NAIVE = "naive"


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (inherited by the processes it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, limit), limit))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] or soft


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User plus system CPU time `pid` has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RedisServer:
    """A redis-server of the run's own, on a free loopback port, with a known `maxclients`."""

    maxclients: int = 10000
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self._workdir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._workdir.name,
             "--maxclients", str(self.maxclients)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a target worker is asked to do in one scenario."""

    max_connections: int
    demo_runs: bool = False
    demo_interval_ms: int = 1000
    loop: str = "asyncio"  # or "uvloop": both targets always run on the same loop


@dataclass
class Worker:
    """One running target process (the service's worker or the baseline) on a free port."""

    target: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    profiler: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def service_env(redis_url: str, port: int, config: WorkerConfig) -> dict[str, str]:
    """Environment for `python -m service serve`: our settings, none inherited from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    env.update(
        SSE_REDIS_URL=redis_url,
        SSE_HOST="127.0.0.1",
        SSE_PORT=str(port),
        SSE_DEMO_RUNS="true" if config.demo_runs else "false",
        SSE_PRODUCER_INTERVAL_MS=str(config.demo_interval_ms),
        SSE_MAX_CONNECTIONS=str(config.max_connections),
        SSE_MAX_CONNECTIONS_PER_SESSION=str(config.max_connections),
        SSE_SESSION_TTL_S="600",
        SSE_DRAIN_TIMEOUT_S="1",
        # Per-stream INFO lines would be measured too; production keeps them, the bench not.
        SSE_LOG_LEVEL="WARNING",
        SSE_EVENT_LOOP=config.loop,
    )
    return env


def command_for(target: str, redis_url: str, port: int, config: WorkerConfig) -> list[str]:
    if target == SERVICE:
        return [sys.executable, "-m", "service", "serve"]
    return [
        sys.executable, "-m", "bench.naive_server", "--port", str(port),
        "--redis-url", redis_url, "--loop", config.loop,
        "--demo-interval-ms", str(config.demo_interval_ms if config.demo_runs else 0),
    ]  # fmt: skip


async def start_worker(
    target: str,
    redis_url: str,
    config: WorkerConfig,
    log_dir: Path,
    profile_dir: Path | None = None,
) -> Worker:
    """Start a target and wait until it answers /healthz."""
    port = free_port()
    log_path = log_dir / f"{target}-{port}.log"
    env: Mapping[str, str] = (
        service_env(redis_url, port, config) if target == SERVICE else dict(os.environ)
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting a process does not block
            command_for(target, redis_url, port, config),
            cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    worker = Worker(target, process, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{target} exited at start:\n{worker.log_tail()}")
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            if (await fetch(port, "/healthz", timeout_s=1.0)).status == 200:
                if profile_dir is not None:
                    worker.profiler = _start_profiler(worker, profile_dir)
                return worker
        await asyncio.sleep(0.05)
    stop_worker(worker)
    raise RuntimeError(f"{target} did not become healthy:\n{worker.log_tail()}")


def _start_profiler(worker: Worker, profile_dir: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the worker until it stops: collapsed stacks, one file per worker."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    profile_dir.mkdir(parents=True, exist_ok=True)
    output = profile_dir / f"{worker.target}-{worker.port}.txt"
    return subprocess.Popen(
        [py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "200",
         "--output", str(output), "--pid", str(worker.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_worker(worker: Worker) -> None:
    if worker.profiler is not None:
        worker.profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            worker.profiler.wait(30)
        except subprocess.TimeoutExpired:
            worker.profiler.kill()
            worker.profiler.wait(5)
    _terminate(worker.process)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def bench_redis(url: str, max_connections: int = 8) -> redis.Redis:
    """The generator's own client, named so it is left out of the worker's connection count."""
    return redis.Redis.from_url(url, client_name=BENCH_CLIENT_NAME, max_connections=max_connections)


async def worker_redis_connections(client: redis.Redis) -> int:
    """Redis connections open right now that are not the generator's (one target runs at a time)."""
    clients = await client.client_list()
    return sum(1 for c in clients if c.get("name") != BENCH_CLIENT_NAME)


async def wait_quiet(pid: int, timeout_s: float = 10.0, idle_share: float = 0.05) -> None:
    """Wait until `pid` uses under `idle_share` of a core for two 100 ms samples in a row.

    Streams that have their headers may still be in set-up work (the log replay); this keeps
    that work out of what a step measures.
    """
    deadline = time.monotonic() + timeout_s
    quiet, last = 0, cpu_s(pid)
    while quiet < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = cpu_s(pid)
        quiet = quiet + 1 if now - last < 0.1 * idle_share else 0
        last = now


async def redis_cpu_s(client: redis.Redis) -> float:
    """CPU time the Redis server has used so far, in seconds."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextlib.contextmanager
def log_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as path:
        yield Path(path)
