"""The delivery steps' publisher, in a process of its own: `python -m bench.publish`.

Publishing used to share the load generator's event loop with the SSE receivers, and one
awaited script call per event cost that process more than the worker under test spent, so
"max" measured the generator. Here it runs apart, and cheaply, yet on the service's own
publish path: a real `service.publisher.Publisher` (`script_call`) gives the exact script,
keys and arguments it would send for each session. Each lane then sends those as pipelined
EVALSHA commands over a raw connection (hand-encoded RESP, replies parsed by hiredis) and
checks every reply is `['ok', id]`.

Protocol with the parent (`PublisherProcess`): one JSON plan line on stdin; the child sets
up its connections and loads the script, prints `ready`; on `go` it publishes, printing the
running count of sent events now and then, and finally `done <json report>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis

from service.keys import Keys
from service.publisher import Publisher

from .tally import event_data

LANES = 16
BATCH = 64  # unpaced: events per pipelined batch on one lane
MAX_PACED_BATCH = 1024  # paced: at most this many due events in one batch
PROGRESS_INTERVAL_S = 0.25
TIMER_SLACK_S = 0.001
START_TIMEOUT_S = 20.0
REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENT_NAME = "bench"  # the generator's connections are left out of worker connection counts

_EVENT_MARK = "bench-event-mark"
_DATA_MARK = "bench-data-mark"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to publish: `events` events to each session; `rate` events/s overall (0 = max)."""

    redis_url: str
    session_ids: list[str]
    events: int
    rate: float
    lanes: int = LANES
    batch: int = BATCH
    session_ttl_s: float = 600
    log_maxlen: int = 1000
    first_seq: int = 0  # sequence number of each session's first event in this plan
    finish_last: bool = True  # name each session's last event of this plan `finish`


@dataclass
class Report:
    """What the publisher did between `go` and its last reply."""

    published: int = 0
    failures: int = 0
    failure: str = ""
    cpu_s: float = 0.0  # the publisher process's utime + stime while publishing
    started_ns: int = 0  # CLOCK_MONOTONIC, comparable with the receivers'
    finished_ns: int = 0
    batches: int = 0


# --- the child: encode, send, check -------------------------------------------------------


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _word(value: Any) -> bytes:
    """One command argument as redis-py would encode it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, float):
        return repr(value).encode()
    if isinstance(value, int):
        return str(value).encode()
    raise TypeError(f"cannot send {value!r} to Redis")


def _command(*parts: str | bytes) -> bytes:
    items = [part.encode() if isinstance(part, str) else part for part in parts]
    return b"*%d\r\n" % len(items) + b"".join(_bulk(item) for item in items)


class _NoClient:
    """Enough of a Redis client for a `Publisher` that only builds script calls."""

    def register_script(self, script: str) -> object:
        return script


@dataclass(frozen=True, slots=True)
class _Template:
    """One session's EVALSHA command, cut where the event name and the data go."""

    head: bytes
    middle: bytes
    tail: bytes


async def _templates(plan: Plan) -> tuple[str, list[_Template]]:
    """The script text and, per session, the command `Publisher.publish` would send."""
    publisher = Publisher(
        cast(Any, _NoClient()), Keys(), session_ttl_s=plan.session_ttl_s,
        log_maxlen=plan.log_maxlen,
    )  # fmt: skip
    calls = [
        publisher.script_call(session_id, _EVENT_MARK, _DATA_MARK)
        for session_id in plan.session_ids
    ]
    sha = _script_sha(Publisher.SCRIPT)
    templates = []
    for call in calls:
        keys, args = call.keys, call.args
        event_at, data_at = args.index(_EVENT_MARK), args.index(_DATA_MARK)
        if event_at > data_at:
            raise RuntimeError("Publisher's script arguments changed order: event after data")
        words = ["EVALSHA", sha, len(keys), *keys, *args]
        cut_event, cut_data = 3 + len(keys) + event_at, 3 + len(keys) + data_at
        encoded = [_bulk(_word(word)) for word in words]
        templates.append(
            _Template(
                b"*%d\r\n" % len(words) + b"".join(encoded[:cut_event]),
                b"".join(encoded[cut_event + 1 : cut_data]),
                b"".join(encoded[cut_data + 1 :]),
            )
        )
    return Publisher.SCRIPT, templates


def _script_sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


class _Connection(asyncio.Protocol):
    """One raw Redis connection: write a batch of commands, await that many replies."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._replies: list[Any] = []
        self._wanted = 0
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("Redis closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        replies = self._replies
        while (reply := self._reader.gets()) is not False:
            replies.append(reply)
        if self._waiter is not None and len(replies) >= self._wanted:
            self._replies = []
            self._waiter.set_result(replies)
            self._waiter = None

    async def request(self, payload: bytes, replies: int) -> list[Any]:
        if self._lost is not None:
            raise self._lost
        assert self._transport is not None
        assert self._waiter is None
        self._wanted = replies
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(payload)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _connect(url: str) -> _Connection:
    """A raw connection to `url` (redis:// or unix://), authenticated, on its db, named."""
    parsed = urlparse(url)
    loop = asyncio.get_running_loop()
    if parsed.scheme == "unix":
        _, connection = await loop.create_unix_connection(_Connection, parsed.path)
    else:
        _, connection = await loop.create_connection(
            _Connection, parsed.hostname or "127.0.0.1", parsed.port or 6379
        )
    setup = []
    if parsed.password:
        user = [unquote(parsed.username)] if parsed.username else []
        setup.append(_command("AUTH", *user, unquote(parsed.password)))
    db = parsed.path.strip("/") if parsed.scheme != "unix" else ""
    if db and db != "0":
        setup.append(_command("SELECT", db))
    setup.append(_command("CLIENT", "SETNAME", CLIENT_NAME))
    for reply in await connection.request(b"".join(setup), len(setup)):
        if isinstance(reply, Exception):
            raise RuntimeError(f"Redis refused the publisher's connection set-up: {reply}")
    return connection


@dataclass
class _Publishing:
    """The child's state: its lanes, each lane's sessions and the running totals."""

    plan: Plan
    templates: list[_Template]
    connections: list[_Connection] = field(default_factory=list)
    report: Report = field(default_factory=Report)

    def check(self, replies: list[Any]) -> None:
        report = self.report
        report.batches += 1
        for reply in replies:
            if type(reply) is list and len(reply) == 2 and reply[0] == b"ok":
                report.published += 1
            else:
                report.failures += 1
                report.failure = report.failure or f"unexpected reply: {reply!r}"

    async def lane(self, index: int, start: float) -> None:
        plan, connection = self.plan, self.connections[index]
        lanes = len(self.connections)
        mine = self.templates[index::lanes]
        per_seq = len(mine)
        total = per_seq * plan.events
        last_seq = plan.events - 1 if plan.finish_last else -1
        plain, finish = _bulk(b""), _bulk(b"finish")
        sent = 0
        while sent < total:
            if plan.rate:
                # Event k of this lane is due at start + (k * lanes + index) / rate. Timers
                # fire up to a millisecond early: count what is due by then, or the lane
                # would spin on sub-millisecond sleeps.
                ahead = time.monotonic() + TIMER_SLACK_S - start
                due = min(total, int((ahead * plan.rate - index) // lanes) + 1)
                if due <= sent:
                    await asyncio.sleep(
                        start + (sent * lanes + index) / plan.rate - time.monotonic()
                    )
                    continue
                count = min(due - sent, MAX_PACED_BATCH)
            else:
                count = min(plan.batch, total - sent)
            now = time.monotonic_ns()
            parts: list[bytes] = []
            for k in range(sent, sent + count):
                seq, template = divmod(k, per_seq)
                t = mine[template]
                data = event_data(plan.first_seq + seq, now).encode()
                parts += (
                    t.head,
                    finish if seq == last_seq else plain,
                    t.middle,
                    b"$%d\r\n%b\r\n" % (len(data), data),
                    t.tail,
                )
            self.check(await connection.request(b"".join(parts), count))
            sent += count


async def _prepare(plan: Plan) -> _Publishing:
    script, templates = await _templates(plan)
    lanes = max(1, min(plan.lanes, len(plan.session_ids)))
    publishing = _Publishing(plan, templates)
    publishing.connections = list(
        await asyncio.gather(*(_connect(plan.redis_url) for _ in range(lanes)))
    )
    (sha,) = await publishing.connections[0].request(_command("SCRIPT", "LOAD", script), 1)
    if isinstance(sha, Exception) or sha.decode() != _script_sha(script):
        raise RuntimeError(f"SCRIPT LOAD answered {sha!r}")
    return publishing


async def _publish(publishing: _Publishing) -> Report:
    report = publishing.report

    async def show_progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            _say(str(report.published + report.failures))

    progress = asyncio.create_task(show_progress())
    cpu_before = time.process_time()
    report.started_ns = time.monotonic_ns()
    start = report.started_ns / 1e9
    try:
        await asyncio.gather(
            *(publishing.lane(i, start) for i in range(len(publishing.connections)))
        )
    finally:
        progress.cancel()
    report.finished_ns = time.monotonic_ns()
    report.cpu_s = time.process_time() - cpu_before
    for connection in publishing.connections:
        connection.close()
    return report


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _loop_factory() -> Any:
    try:
        import uvloop  # noqa: PLC0415 - optional: lighter
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    plan = Plan(**json.loads(sys.stdin.readline()))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        publishing = runner.run(_prepare(plan))
        _say("ready")
        if sys.stdin.readline().strip() != "go":
            return 1
        report = runner.run(_publish(publishing))
    _say("done " + json.dumps(asdict(report)))
    return 0


# --- the parent: start, go, follow -------------------------------------------------------


class PublisherProcess:
    """A running `python -m bench.publish` child holding one step's plan."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._finished = False

    @property
    def pid(self) -> int:
        return self._process.pid

    async def _line(self) -> str:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            await self._process.wait()
            assert self._process.stderr is not None
            error = (await self._process.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"the publisher exited ({self._process.returncode}):\n{error}")
        return line.decode().strip()

    async def ready(self) -> None:
        """Wait until its connections are up and the script is loaded."""
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await self._line()
        if line != "ready":
            raise RuntimeError(f"the publisher said {line!r} instead of ready")

    async def run(self, advance: Callable[[int], None]) -> Report:
        """Publish the plan; `advance` is told how many events went out as they do."""
        assert self._process.stdin is not None
        self._process.stdin.write(b"go\n")
        await self._process.stdin.drain()
        shown = 0
        while True:
            line = await self._line()
            if line.startswith("done "):
                report = Report(**json.loads(line[5:]))
                self._finished = True
                advance(report.published + report.failures - shown)
                return report
            count = int(line)
            advance(count - shown)
            shown = count

    async def stop(self) -> None:
        """Let a finished child exit (it does by itself after `done`); kill one that is not."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0 if self._finished else 0):
                await self._process.wait()
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()


@contextlib.asynccontextmanager
async def publisher_process(plan: Plan) -> AsyncIterator[PublisherProcess]:
    """Start the publisher for `plan` (await `ready()` before `run()`); stop it after."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.publish",
        cwd=REPO_ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    publisher = PublisherProcess(process)
    try:
        assert process.stdin is not None
        process.stdin.write(json.dumps(asdict(plan)).encode() + b"\n")
        await process.stdin.drain()
        yield publisher
    finally:
        await publisher.stop()


if __name__ == "__main__":
    sys.exit(main())
