"""The processes a run measures: its own redis-server and the contestants.

Each contestant runs in its own process (or process tree: nginx's master and worker), apart
from the load generator, so the generator's work never counts against the server; the
server's memory and CPU are read from /proc over its whole process tree.

Contestants: `sse-fanout` (the service's worker), `nchan-memory` and `nchan-redis` (nginx
with the nchan module, see `nchan.py`), and `naive` (the one-subscription-per-client
baseline, `naive_server.py`).
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
from dataclasses import dataclass, field, fields
from pathlib import Path

import redis.asyncio as redis

from service.settings import Settings

from . import nchan, procs
from .procs import Pinning
from .sse_client import fetch

START_TIMEOUT_S = 20.0
BENCH_CLIENT_NAME = "bench"
REPO_ROOT = Path(__file__).resolve().parent.parent

SERVICE = "sse-fanout"
NCHAN_MEMORY = "nchan-memory"
NCHAN_REDIS = "nchan-redis"
NAIVE = "naive"
CONTESTANTS = (SERVICE, NCHAN_MEMORY, NCHAN_REDIS, NAIVE)
NCHAN = (NCHAN_MEMORY, NCHAN_REDIS)
# The contestants whose deployment includes Redis: its CPU counts as theirs.
USES_REDIS = frozenset({SERVICE, NCHAN_REDIS, NAIVE})
# How each contestant is published to: the service's Lua script in Redis, or nchan's
# HTTP publisher endpoint.
REDIS_SCRIPT = "redis-script"
NCHAN_HTTP = "nchan-http"


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


def missing(target: str, redis_url: str) -> str | None:
    """Why `target` cannot run on this machine (None: it can)."""
    if target not in CONTESTANTS:
        return f"unknown contestant (choose from {', '.join(CONTESTANTS)})"
    if target in NCHAN:
        reason = nchan.nchan_missing()
        if reason:
            return reason
    if target == NCHAN_REDIS:
        try:
            nchan.redis_server_line(redis_url)
        except ValueError as error:
            return str(error)
    return None


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
    """What a contestant is asked to do in one scenario."""

    max_connections: int
    demo_runs: bool = False
    demo_interval_ms: int = 1000
    loop: str = "asyncio"  # or "uvloop": the Python contestants always run on the same loop
    processes: int = 1  # server worker processes (nginx workers; the service's, if it can)
    # The service's own settings for this scenario, as (key, value) over the bench's defaults.
    settings: tuple[tuple[str, str], ...] = ()


@dataclass
class Worker:
    """One running contestant (a process, or a process tree) on a free loopback port."""

    target: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    profiler: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def publish_wire(self) -> str:
        return NCHAN_HTTP if self.target in NCHAN else REDIS_SCRIPT

    @property
    def uses_redis(self) -> bool:
        return self.target in USES_REDIS

    def stream_path(self, session_id: str) -> str:
        """The GET that opens an event stream on `session_id`."""
        if self.target in NCHAN:
            return f"{nchan.SUBSCRIBE_PATH}?id={session_id}"
        return f"/sse/connect?sessionId={session_id}"

    def cpu_s(self) -> float:
        """CPU time used so far by the server's processes, in seconds."""
        return procs.tree_cpu_s(self.pid)

    def pss_kib(self) -> int:
        """Proportional set size of the server's processes, in KiB."""
        return procs.tree_pss_kib(self.pid)

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
        SSE_SESSION_TTL_S=str(nchan.MESSAGE_TIMEOUT_S),
        SSE_DRAIN_TIMEOUT_S="1",
        # The load generator is one client address asking for thousands of sessions and
        # runs: the per-address limits would measure themselves.
        SSE_SESSION_RATE_PER_S="0",
        SSE_RUN_RATE_PER_S="0",
        # Per-stream INFO lines would be measured too; production keeps them, the bench not.
        SSE_LOG_LEVEL="WARNING",
        SSE_EVENT_LOOP=config.loop,
    )
    env.update({f"SSE_{key.upper()}": value for key, value in config.settings})
    if "workers" in {f.name for f in fields(Settings)}:
        env["SSE_WORKERS"] = str(config.processes)
    elif config.processes != 1:
        raise RuntimeError("this version of the service runs one worker process per server")
    return env


def _python_command(target: str, redis_url: str, port: int, config: WorkerConfig) -> list[str]:
    if target == SERVICE:
        return [sys.executable, "-m", "service", "serve"]
    return [
        sys.executable, "-m", "bench.naive_server", "--port", str(port),
        "--redis-url", redis_url, "--loop", config.loop,
        "--demo-interval-ms", str(config.demo_interval_ms if config.demo_runs else 0),
    ]  # fmt: skip


def _nginx_command(
    target: str, redis_url: str, port: int, config: WorkerConfig, log_dir: Path
) -> list[str]:
    binary = nchan.nginx_binary()
    if binary is None:
        raise RuntimeError(nchan.nchan_missing() or "nginx is not installed")
    workdir = log_dir / f"{target}-{port}"
    workdir.mkdir()
    config_path = workdir / "nginx.conf"
    config_path.write_text(
        nchan.nginx_config(
            port=port,
            workdir=workdir,
            redis_url=redis_url if target == NCHAN_REDIS else None,
            workers=config.processes,
            max_connections=max(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100),
        )
    )
    return nchan.nginx_command(binary, config_path, workdir)


async def start_worker(
    target: str,
    redis_url: str,
    config: WorkerConfig,
    log_dir: Path,
    *,
    profile_dir: Path | None = None,
    pinning: Pinning | None = None,
) -> Worker:
    """Start a contestant, wait until it can serve, and pin it to the server cores."""
    port = free_port()
    log_path = log_dir / f"{target}-{port}.log"
    if target in NCHAN:
        command = _nginx_command(target, redis_url, port, config, log_dir)
        env: Mapping[str, str] = dict(os.environ)
    else:
        command = _python_command(target, redis_url, port, config)
        env = service_env(redis_url, port, config) if target == SERVICE else dict(os.environ)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting a process does not block
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    worker = Worker(target, process, port, log_path)
    try:
        await _until_ready(worker)
        if pinning is not None and pinning.active:
            procs.pin_tree(worker.pid, pinning.server_cores)
        if profile_dir is not None and target not in NCHAN:
            worker.profiler = _start_profiler(worker, profile_dir)
    except BaseException:
        stop_worker(worker)  # a server that cannot be measured is not left running
        raise
    return worker


async def _until_ready(worker: Worker) -> None:
    """Wait for /healthz; nchan-redis also until a publish goes through Redis."""
    deadline = time.monotonic() + START_TIMEOUT_S
    healthy = False
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"{worker.target} exited at start:\n{worker.log_tail()}")
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            healthy = healthy or (await fetch(worker.port, "/healthz", timeout_s=1.0)).status == 200
            if healthy and (worker.target != NCHAN_REDIS or await _nchan_publishes(worker)):
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{worker.target} did not become ready:\n{worker.log_tail()}")


async def _nchan_publishes(worker: Worker) -> bool:
    """nchan connects to Redis after it starts: true once a probe message is accepted."""
    reply = await fetch(
        worker.port, f"{nchan.PUBLISH_PATH}?id=bench-probe", timeout_s=2.0, method="POST",
        body=b"probe",
    )  # fmt: skip
    return reply.status in (201, 202)


def _start_profiler(worker: Worker, profile_dir: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the worker until it stops: collapsed stacks, one file per worker."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    profile_dir.mkdir(parents=True, exist_ok=True)
    output = profile_dir / f"{worker.target}-{worker.port}.txt"
    return subprocess.Popen(
        [py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "200",
         "--output", str(output), "--pid", str(worker.pid), "--subprocesses"],
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


def pin_redis(server: RedisServer | None, pinning: Pinning) -> bool:
    """Put the bench's own redis-server on the server cores (a given --redis-url stays)."""
    if server is None or server.process is None or not pinning.active:
        return False
    return procs.pin_tree(server.process.pid, pinning.server_cores) > 0


def bench_redis(url: str, max_connections: int = 8) -> redis.Redis:
    """The generator's own client, named so it is left out of the worker's connection count."""
    return redis.Redis.from_url(url, client_name=BENCH_CLIENT_NAME, max_connections=max_connections)


async def worker_redis_connections(client: redis.Redis) -> int:
    """Redis connections open right now that are not the generator's (one target runs at a time)."""
    clients = await client.client_list()
    return sum(1 for c in clients if c.get("name") != BENCH_CLIENT_NAME)


async def wait_quiet(worker: Worker, timeout_s: float = 10.0, idle_share: float = 0.05) -> None:
    """Wait until the server uses under `idle_share` of a core for two 100 ms samples in a row.

    Streams that have their headers may still be in set-up work (the log replay); this keeps
    that work out of what a step measures.
    """
    deadline = time.monotonic() + timeout_s
    quiet, last = 0, worker.cpu_s()
    while quiet < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = worker.cpu_s()
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
