"""The drain scenario: a worker holding thousands of streams behind nginx is sent SIGTERM.

Three service workers sit behind nginx (config/nginx.conf, its upstream and listen lines
pointed at loopback). Every stream is opened on the first worker directly, so it holds them
all; then it gets SIGTERM and each client does what EventSource does: wait for the last
`retry:` it was sent, then reconnect, through nginx, with `Last-Event-ID`, and again after a
refusal or a cut. The scenario runs twice: the old behaviour (every stream ended at once, one
fixed `retry:`) and the paced drain with spread retries (the defaults). It reports the
reconnects arriving per 100 ms (the peak is what the other workers must absorb), the time
until every client was streaming again, and every event's fate: events are published before,
during and after the drain, and each client must have each of its session's events once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from service.keys import Keys
from service.publisher import Publisher

from .nchan import nginx_binary
from .procs import Pinning
from .progress import Progress
from .sse_client import SSEStream, open_many
from .stack import (
    REPO_ROOT,
    SERVICE,
    Worker,
    WorkerConfig,
    free_port,
    start_worker,
    stop_worker,
)

# The two behaviours compared: settings of each worker (the paced one is the defaults').
MODES: dict[str, dict[str, str]] = {
    "all-at-once": {"drain_spread": "0", "retry_spread": "0"},
    "paced": {"drain_spread": "0.5", "retry_spread": "0.5"},
}
RETRY_MS = 2000
DRAIN_TIMEOUT_S = 10.0
RETRY_SPREAD = 0.5  # the paced mode's, for the largest `retry:` in the deadline
BUCKET_S = 0.1
WORKERS = 3
PUBLISH_CONCURRENCY = 32
# How long past the deadline the run waits for stragglers before it calls them lost.
GRACE_S = 30.0
# How long the last round (published once every client is back) may take to arrive.
DELIVERY_TIMEOUT_S = 60.0

NGINX_CONF = REPO_ROOT / "config" / "nginx.conf"
_UPSTREAM_LINE = re.compile(r"^(?P<indent>[ \t]*)server worker:8080 resolve (?P<rest>.*;)$", re.M)
_LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen 8080;$", re.M)
_ACCESS_LOG = re.compile(r"^(?P<indent>[ \t]*)access_log /dev/stdout upstream_log;$", re.M)


def nginx_conf(worker_ports: list[int], listen_port: int) -> str:
    """config/nginx.conf in front of `worker_ports`, on `listen_port`, without access log.

    `resolve` goes with the host name (a literal address has nothing to re-resolve), and a
    line per request would cost the machine the generator and the workers share.
    """
    text = NGINX_CONF.read_text()

    def servers(match: re.Match[str]) -> str:
        return "\n".join(
            f"{match['indent']}server 127.0.0.1:{port} {match['rest']}" for port in worker_ports
        )

    text, upstreams = _UPSTREAM_LINE.subn(servers, text)
    text, listens = _LISTEN_LINE.subn(rf"\g<indent>listen 127.0.0.1:{listen_port};", text)
    text, logs = _ACCESS_LOG.subn(r"\g<indent>access_log off;", text)
    if (upstreams, listens, logs) != (1, 1, 1):
        raise RuntimeError("config/nginx.conf no longer has the lines the bench adapts")
    return text


@contextlib.contextmanager
def nginx_in_front(worker_ports: list[int], workdir: Path) -> Iterator[int]:
    """nginx balancing over `worker_ports`; yields its port."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    port = free_port()
    prefix = workdir / f"nginx-{port}"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(nginx_conf(worker_ports, port))
    argv = [binary, "-e", "stderr", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
            "-g", f"pid {prefix / 'nginx.pid'}; daemon off;"]  # fmt: skip
    with (prefix / "nginx.log").open("wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(prefix / 'nginx.log').read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def resume_request(session_id: str, port: int, last_id: bytes) -> bytes:
    """EventSource's reconnect: the stream's GET with `Last-Event-ID`."""
    resume = f"Last-Event-ID: {last_id.decode()}\r\n" if last_id else ""
    return (
        f"GET /sse/connect?sessionId={session_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n"
    ).encode()


@dataclass
class Client:
    """One EventSource-like client: what it received, when it reconnected, when it resumed."""

    session_id: str
    ids: list[bytes] = field(default_factory=list)
    arrived: dict[bytes, float] = field(default_factory=dict)  # event id: when (monotonic)
    awaited: bytes | None = None  # the event published while it was away
    retry_ms: int = RETRY_MS
    attempts: list[float] = field(default_factory=list)  # reconnects sent (monotonic)
    resumed_at: float | None = None  # the reconnect whose stream stayed open

    def caught_up_at(self) -> float | None:
        """When it was streaming again with everything it missed: its reconnect answered and
        the event published while it was away received (replayed or live)."""
        if self.resumed_at is None or self.awaited is None or self.awaited not in self.arrived:
            return None
        return max(self.resumed_at, self.arrived[self.awaited])

    stream: SSEStream | None = None


class Crowd:
    """Every client of the run, following its stream until told to stop."""

    def __init__(self, count: int) -> None:
        self.clients = [Client(f"drain-{n:05d}") for n in range(count)]
        self.stopping = False
        self._received = 0
        self._wanted = 0
        self._reached: asyncio.Future[None] | None = None
        self._followers: list[asyncio.Task[None]] = []

    def sink(self, stream: SSEStream, event_id: bytes, event: bytes, data: bytes) -> None:
        del event, data
        client = self.clients[stream.tag]
        client.ids.append(event_id)
        client.arrived.setdefault(event_id, time.monotonic())
        self._received += 1
        reached = self._reached
        if reached is not None and self._received >= self._wanted and not reached.done():
            reached.set_result(None)

    async def until_received(self, total: int, timeout_s: float) -> bool:
        """Wait until `total` events arrived in all; False if the deadline passed first."""
        if self._received >= total:
            return True
        self._wanted = total
        self._reached = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._reached
        except TimeoutError:
            return False
        finally:
            self._reached = None
        return True

    async def follow(self, tag: int, nginx_port: int) -> None:
        """After the stream ends: wait `retry:`, reconnect through nginx, until stopped."""
        loop = asyncio.get_running_loop()
        client = self.clients[tag]
        while not self.stopping:
            stream = client.stream
            if stream is not None:
                await stream.closed
                client.retry_ms = (
                    stream.retry_ms if stream.retry_ms is not None else (client.retry_ms)
                )
            if self.stopping:
                return
            await asyncio.sleep(client.retry_ms / 1000)
            client.attempts.append(time.monotonic())
            last_id = client.ids[-1] if client.ids else b""
            request = resume_request(client.session_id, nginx_port, last_id)
            try:
                async with asyncio.timeout(30):
                    _, fresh = await loop.create_connection(
                        functools.partial(SSEStream, request, self.sink, tag),
                        "127.0.0.1",
                        nginx_port,
                    )
                    status = await fresh.headers_received
            except (OSError, TimeoutError):
                client.stream = None
                continue
            client.stream = fresh
            if status == 200:
                client.resumed_at = time.monotonic()
            else:
                fresh.close()

    def start_following(self, nginx_port: int) -> None:
        """Every client starts behaving like EventSource once its stream ends."""
        self._followers = [
            asyncio.create_task(self.follow(tag, nginx_port)) for tag in range(len(self.clients))
        ]

    async def until_all_resumed(self, victim: Worker, give_up: float, bar: Any) -> float | None:
        """Wait until every client streams again and the victim has exited, or `give_up`;
        when the victim was first seen gone (None: not yet)."""
        done = 0
        exited: float | None = None
        while time.monotonic() < give_up:
            if exited is None and victim.process.poll() is not None:
                exited = time.monotonic()
            now_resumed = self.resumed()
            bar.advance(now_resumed - done)
            done = now_resumed
            if done == len(self.clients) and exited is not None:
                break
            await asyncio.sleep(0.1)
        return exited

    async def stop(self) -> None:
        """Stop reconnecting and hang up every stream."""
        self.stopping = True
        for task in self._followers:
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        self._followers = []
        for client in self.clients:
            if client.stream is not None:
                client.stream.close()

    def resumed(self) -> int:
        """Clients streaming again now, caught up (see `Client.caught_up_at`)."""
        return sum(
            1 for c in self.clients
            if c.caught_up_at() is not None and c.stream is not None
            and not c.stream.closed.done()
        )  # fmt: skip


async def publish_round(
    publisher: Publisher, crowd: Crowd, expected: dict[str, list[bytes]], n: int
) -> None:
    """One event to every client's session; its id is what that client must receive."""
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(client: Client) -> None:
        async with gate:
            published = await publisher.publish(client.session_id, "", f"round {n}")
        expected[client.session_id].append(published.event_id.encode())

    await asyncio.gather(*(one(c) for c in crowd.clients))


def peak_per_bucket(times: list[float], start: float) -> tuple[int, list[int]]:
    """The most reconnects in any 100 ms after `start`, and the count of every bucket."""
    if not times:
        return 0, []
    buckets = [0] * (int(max(0.0, max(times) - start) / BUCKET_S) + 1)
    for t in times:
        buckets[max(0, int((t - start) / BUCKET_S))] += 1
    return max(buckets), buckets


def account(crowd: Crowd, expected: dict[str, list[bytes]]) -> dict[str, int]:
    """Events lost (published, never received) and duplicated (received more than once)."""
    lost = duplicates = unexpected = 0
    lost_by_round = [0, 0, 0]
    for client in crowd.clients:
        wanted = expected[client.session_id]
        got = client.ids
        duplicates += len(got) - len(set(got))
        missing = set(wanted) - set(got)
        lost += len(missing)
        for n, event_id in enumerate(wanted):
            if event_id in missing and n < len(lost_by_round):
                lost_by_round[n] += 1
        unexpected += len(set(got) - set(wanted))
    return {"lost": lost, "duplicates": duplicates, "unexpected": unexpected,
            "lost_by_round": lost_by_round}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DrainSpec:
    """One drain to run: the behaviour, how many streams, and where."""

    mode: str
    streams: int
    redis_url: str
    loop_name: str = "asyncio"
    pinning: Pinning | None = None
    drain_timeout_s: float = DRAIN_TIMEOUT_S

    @property
    def settings(self) -> dict[str, str]:
        return {
            **MODES[self.mode], "retry_ms": str(RETRY_MS),
            "drain_timeout_s": str(self.drain_timeout_s),
        }  # fmt: skip

    @property
    def deadline_s(self) -> float:
        """Every client must be streaming again this long after SIGTERM: the drain's time
        plus the largest `retry:` the paced mode draws."""
        return self.drain_timeout_s + RETRY_MS * (1 + RETRY_SPREAD) / 1000


async def run_drain(
    spec: DrainSpec, client: redis.Redis, log_dir: Path, progress: Progress
) -> dict[str, Any]:
    """One drain of a worker holding `spec.streams` streams, with the settings of its mode."""
    config = WorkerConfig(
        max_connections=spec.streams + 100, loop=spec.loop_name,
        settings=tuple(spec.settings.items()),
    )  # fmt: skip
    workers: list[Worker] = []
    crowd = Crowd(spec.streams)
    try:
        for _ in range(WORKERS):
            workers.append(
                await start_worker(SERVICE, spec.redis_url, config, log_dir, pinning=spec.pinning)
            )
        with nginx_in_front([w.port for w in workers], log_dir) as nginx_port:
            return await _drain_one(
                spec, crowd, workers[0], nginx_port, client=client, progress=progress
            )
    finally:
        await crowd.stop()
        for worker in workers:
            stop_worker(worker)


async def _drain_one(
    spec: DrainSpec,
    crowd: Crowd,
    victim: Worker,
    nginx_port: int,
    *,
    client: redis.Redis,
    progress: Progress,
) -> dict[str, Any]:
    failed = {"scenario": "drain", "target": SERVICE, "mode": spec.mode, "streams": spec.streams}
    with progress.step(f"drain {spec.mode}: opening {spec.streams} streams", spec.streams) as bar:
        opened = await open_many(
            victim.port,
            [f"/sse/connect?sessionId={c.session_id}" for c in crowd.clients],
            crowd.sink,
            on_done=bar.advance,
        )
    if opened.failed:
        return {**failed, "failure": f"{opened.failed} streams failed: {opened.failure}"}
    for stream in opened.streams:
        crowd.clients[stream.tag].stream = stream
    publisher = Publisher(client, Keys(), session_ttl_s=600, log_maxlen=1000)
    expected: dict[str, list[bytes]] = {c.session_id: [] for c in crowd.clients}
    await publish_round(publisher, crowd, expected, 1)
    if not await crowd.until_received(spec.streams, 60):
        return {**failed, "failure": "the first round did not reach every stream"}
    crowd.start_following(nginx_port)
    signalled = time.monotonic()
    victim.process.send_signal(signal.SIGTERM)
    # Published while the clients are away: each gets it when it resumes.
    await publish_round(publisher, crowd, expected, 2)
    for c in crowd.clients:
        c.awaited = expected[c.session_id][-1]
    with progress.step(f"drain {spec.mode}: clients resuming", spec.streams) as bar:
        exited = await crowd.until_all_resumed(victim, signalled + spec.deadline_s + GRACE_S, bar)
    if exited is None:
        exited = await asyncio.to_thread(_wait_exit, victim.process, 15.0)
    await publish_round(publisher, crowd, expected, 3)
    delivered = await crowd.until_received(3 * spec.streams, DELIVERY_TIMEOUT_S)
    await crowd.stop()
    resumed = [c.caught_up_at() for c in crowd.clients]
    attempts = [t for c in crowd.clients for t in c.attempts]
    peak, buckets = peak_per_bucket(attempts, signalled)
    never = sum(1 for t in resumed if t is None)
    last_s = max((t - signalled for t in resumed if t is not None), default=-1.0)
    return {
        **failed,
        "settings": spec.settings,
        "peak_reconnects_per_100ms": peak,
        "reconnect_attempts": len(attempts),
        "all_resumed_s": round(last_s, 2) if not never else None,
        "never_resumed": never,
        "deadline_s": spec.deadline_s,
        "victim_exit_s": None if exited is None else round(exited - signalled, 2),
        "reconnects_per_100ms": buckets,
        **account(crowd, expected),
        "events_per_stream": 3,
        "last_round_complete": delivered,
    }


def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> float | None:
    """When `process` exited (monotonic), or None if it is still running after `timeout_s`."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic()


def print_drain(results: list[dict[str, Any]]) -> dict[str, float]:
    """A line per mode and the ratios of old to new; the ratios."""
    print("\ndrain: SIGTERM to a worker holding every stream, three workers behind nginx")
    for r in results:
        if "failure" in r:
            print(f"  {r['mode']:12} FAILED: {r['failure']}")
            continue
        print(
            f"  {r['mode']:12} streams {r['streams']:6}  peak reconnects/100ms "
            f"{r['peak_reconnects_per_100ms']:6}  all resumed after {r['all_resumed_s']} s "
            f"(deadline {r['deadline_s']:g} s)  attempts {r['reconnect_attempts']}  "
            f"lost {r['lost']}  duplicates {r['duplicates']}"
        )
    by_mode = {r["mode"]: r for r in results if "failure" not in r}
    out: dict[str, float] = {}
    old, new = by_mode.get("all-at-once"), by_mode.get("paced")
    if old and new and new["peak_reconnects_per_100ms"]:
        out["drain peak reconnects per 100 ms: all-at-once/paced"] = round(
            old["peak_reconnects_per_100ms"] / new["peak_reconnects_per_100ms"], 2
        )
    for name, value in out.items():
        print(f"  {name}: {value}")
    return out
