"""`sse-fanout serve --workers N` as real processes: one port shared by every worker, a drain
passed on to all of them, a killed worker replaced while the port keeps answering, and a
pool that cannot start told in one line."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.__main__ import worker_count
from service.cores import usable_cores
from service.settings import build_settings

from redis_process import RedisProcess, free_port, wait_until
from stack_processes import service_env

# Processes or fuzzing for seconds: left out of the quick loop (README, "Test it").
pytestmark = pytest.mark.slow

START_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 10.0


class Pool:
    """`python -m service serve --workers N` on a free loopback port, its stderr in a file."""

    def __init__(self, tmp_path: Path, workers: int, **settings: object) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "pool.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--workers", str(workers)],
            cwd=Path(__file__).resolve().parent.parent,
            env=service_env(port=self.port, **settings),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self) -> None:
        wait_until(
            lambda: "worker processes" in self.log_text() or not self.running,
            "the pool serves",
            START_TIMEOUT_S,
        )
        assert self.running, self.log_text()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def workers(self) -> set[int]:
        """Pids of the supervisor's children alive now."""
        found: set[int] = set()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.process.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    found |= {int(p) for p in (task / "children").read_text().split()}
        return found

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for pid in self.workers():  # never leave a worker behind, even after a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[list[Pool]]:
    started: list[Pool] = []
    yield started
    for pool in started:
        pool.stop()


def request(port: int, target: str) -> tuple[socket.socket, bytes]:
    """A new connection that sent `GET target` and read the response head (kept open)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
    conn.sendall(f"GET {target} HTTP/1.1\r\nHost: pool\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed before the response head: {head!r}"
        head += chunk
    return conn, head


def server_pid(conn: socket.socket, pids: set[int]) -> int:
    """Which of `pids` holds the server end of `conn` (from /proc, so no process tells us)."""
    client_port = conn.getsockname()[1]
    server_port = conn.getpeername()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.rpartition(":")[2], 16) == server_port
            and int(remote.rpartition(":")[2], 16) == client_port
        ):
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            fd_dir = Path(f"/proc/{pid}/fd")
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    raise AssertionError(f"no worker in {pids} holds the connection from port {client_port}")


def connections_on_every_worker(pool: Pool, target: str) -> dict[int, list[socket.socket]]:
    """Connections (at most 40) until every worker holds one, grouped by worker pid."""
    pids = pool.workers()
    held: dict[int, list[socket.socket]] = {}
    for _ in range(40):
        conn, head = request(pool.port, target)
        assert head.startswith(b"HTTP/1.1 200 "), head
        held.setdefault(server_pid(conn, pids), []).append(conn)
        if set(held) == pids:
            return held
    raise AssertionError(f"connections reached only {set(held)} of {pids}")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def read_to_end(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


@pytest.mark.redis
def test_every_worker_serves_on_the_one_port(
    redis_server: RedisProcess, pools: list[Pool], tmp_path: Path
) -> None:
    pool = Pool(tmp_path, 3, redis_url=redis_server.url, producer="off")
    pools.append(pool)
    pool.wait_serving()
    assert len(pool.workers()) == 3
    held = connections_on_every_worker(pool, "/healthz")
    assert len(held) == 3
    lines = [line for line in pool.log_text().splitlines() if "serving on" in line]
    assert len(lines) == 1, pool.log_text()
    assert lines[0].endswith("; 3 worker processes"), lines[0]
    assert f"http://127.0.0.1:{pool.port};" in lines[0]
    for conns in held.values():
        for conn in conns:
            conn.close()


@pytest.mark.redis
def test_sigterm_drains_every_worker_and_exits_0(
    redis_server: RedisProcess, pools: list[Pool], tmp_path: Path
) -> None:
    pool = Pool(
        tmp_path,
        2,
        redis_url=redis_server.url,
        producer="off",
        demo_runs="false",
        drain_timeout_s=5,
    )
    pools.append(pool)
    pool.wait_serving()
    workers = pool.workers()
    streams = connections_on_every_worker(pool, "/sse/connect?sessionId=drained-pool")
    pool.process.send_signal(signal.SIGTERM)
    for conns in streams.values():
        for conn in conns:
            body = read_to_end(conn)
            # Each stream ends cleanly: the chunked body's last chunk, not a reset.
            assert body.endswith(b"0\r\n\r\n"), body[-200:]
            conn.close()
    assert pool.process.wait(20) == 0, pool.log_text()
    assert not pool.workers()
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pool.port), timeout=2).close()
    log = pool.log_text()
    assert "SIGTERM: draining 2 workers" in log
    assert log.count("draining: ending") == 2, log


@pytest.mark.redis
def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(
    redis_server: RedisProcess, pools: list[Pool], tmp_path: Path
) -> None:
    pool = Pool(tmp_path, 2, redis_url=redis_server.url, producer="off")
    pools.append(pool)
    pool.wait_serving()
    before = pool.workers()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Every new connection is answered, including those the kernel gives the dead worker's
    # sockets: they wait in its backlog for the replacement.
    for _ in range(30):
        conn, head = request(pool.port, "/healthz")
        assert head.startswith(b"HTTP/1.1 200 "), head
        conn.close()
    wait_until(
        lambda: len(pool.workers()) == 2 and victim not in pool.workers(),
        "the killed worker is replaced",
        START_TIMEOUT_S,
    )
    replacement = (pool.workers() - before).pop()
    held = connections_on_every_worker(pool, "/healthz")
    assert replacement in held
    log = pool.log_text()
    assert f"(pid {victim}) was killed by SIGKILL after " in log
    assert "starting a new one in 0.1s" in log
    assert f"(pid {replacement}) serves" in log
    for conns in held.values():
        for conn in conns:
            conn.close()


def test_workers_that_cannot_start_stop_the_pool_with_one_line(tmp_path: Path) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=service_env(redis_url=unreachable, port=free_port()),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sse-fanout: cannot reach redis at {unreachable} (5 attempts")


# A pool whose first worker fails at once and whose second fails the same way a moment
# later, after the supervisor has given up (and told it to stop, which it does not heed).
STAGGERED_FAILURES = """
import logging, signal, sys, time
from service.settings import StartupError
from service.supervisor import Supervisor

def main(index, link):
    if index == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # still busy failing to start
        time.sleep(0.5)
    link.failed(f"worker {index + 1}: cannot reach redis")
    return 1

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
pool = Supervisor(2, main, drain_timeout_s=5, release_sockets=lambda: None,
                  on_serving=lambda: None)
try:
    pool.run()
except StartupError as error:
    print(f"gave up: {error}", file=sys.stderr)
"""


def test_workers_failing_one_after_another_are_told_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", STAGGERED_FAILURES],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stderr.splitlines() == ["gave up: worker 1: cannot reach redis"]


def test_a_pool_needs_a_shared_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=service_env(port=free_port()),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "sse-fanout: --workers above 1 needs a redis_url: the embedded stand-in lives inside "
        "one process, so its workers would not share sessions or events\n"
    )


def test_a_busy_port_stops_a_pool_as_it_stops_one_worker(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--workers", "2"],
            cwd=tmp_path,
            env=service_env(port=port, redis_url="redis://127.0.0.1:1/0"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr == (
        f"sse-fanout: cannot listen on http://127.0.0.1:{port}: Address already in use\n"
    )


@pytest.mark.redis
def test_workers_do_not_outlive_a_killed_supervisor(
    redis_server: RedisProcess, pools: list[Pool], tmp_path: Path
) -> None:
    pool = Pool(tmp_path, 2, redis_url=redis_server.url, producer="off")
    pools.append(pool)
    pool.wait_serving()
    workers = pool.workers()
    pool.process.kill()
    pool.process.wait(5)
    wait_until(
        lambda: not any(alive(pid) for pid in workers),
        "the workers drain after their supervisor died",
        START_TIMEOUT_S,
    )


def test_worker_count_defaults_to_the_usable_cores_with_a_shared_redis() -> None:
    shared = "redis://127.0.0.1:6379/0"
    assert worker_count(build_settings({})) == 1  # the stand-in: one process, no line needed
    assert worker_count(build_settings({"redis_url": shared})) == usable_cores()
    assert worker_count(build_settings({"redis_url": shared, "workers": 3})) == 3
    assert worker_count(build_settings({"workers": 1})) == 1
