"""The publisher, in a process of its own: `python -m bench.publish`.

Publishing used to share the load generator's event loop with the SSE receivers, and one
awaited call per event cost that process more than the server under test spent, so "max"
measured the generator. Here it runs apart, and cheaply, through each contestant's own
publish path (its "wire"):

- `redis-script` (sse-fanout and the naive baseline): the service's publish script. A real
  `service.publisher.Publisher` (`script_call`) gives the exact script, keys and arguments
  it would send for each session; each lane sends those as pipelined EVALSHA commands over
  a raw connection (hand-encoded RESP, replies parsed by hiredis) and checks every reply is
  `['ok', id]`.
- `nchan-http` (nchan, either store): nchan's publisher endpoint, one HTTP/1.1 POST per
  event (`X-EventSource-Event` names it), pipelined on keep-alive connections to nginx;
  every reply must be `201 Created` or `202 Accepted`.

Two modes. A plan publishes `events` events to each of its sessions, paced or flat out.
A stream (`Plan.stream`) publishes one event to each session id the parent writes to stdin,
as soon as it arrives: the churn scenario's "first event" after each connect.

Protocol with the parent (`PublisherProcess`): one JSON plan line on stdin; the child sets
up its connections (and loads the script), prints `ready`; on `go` it publishes, printing
the running count of sent events now and then (plans only), and finally `done <json
report>`. A stream reads lines of space-separated session ids after `go`, until `end`.
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
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlparse

import hiredis

from service.keys import Keys
from service.publisher import Publisher

from .tally import event_data

LANES = 16
BATCH = 64  # unpaced: events per pipelined batch on one lane
MAX_PACED_BATCH = 1024  # paced, or a stream: at most this many due events in one batch
PROGRESS_INTERVAL_S = 0.25
TIMER_SLACK_S = 0.001
START_TIMEOUT_S = 20.0
REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENT_NAME = "bench"  # the generator's connections are left out of worker connection counts
REDIS_SCRIPT = "redis-script"
NCHAN_HTTP = "nchan-http"

_EVENT_MARK = "bench-event-mark"
_DATA_MARK = "bench-data-mark"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to publish: `events` events to each session; `rate` events/s overall (0 = max)."""

    redis_url: str
    session_ids: list[str]
    events: int
    rate: float
    wire: str = REDIS_SCRIPT
    http_port: int = 0  # nchan-http: nginx's port
    http_path: str = "/pub"
    lanes: int = LANES
    batch: int = BATCH
    session_ttl_s: float = 600
    log_maxlen: int = 1000
    first_seq: int = 0  # sequence number of each session's first event in this plan
    finish_last: bool = True  # name each session's last event of this plan `finish`
    stream: bool = False  # publish event 0 to each session id read from stdin instead


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


class _Replies(Protocol):
    """An incremental reply parser: hiredis.Reader's interface."""

    def feed(self, data: bytes) -> None: ...

    def gets(self) -> Any: ...


class _Wire(Protocol):
    """How one contestant is published to."""

    def command(self, session_id: str, event: bytes, data: bytes) -> bytes: ...

    def replies(self) -> _Replies: ...

    def ok(self, reply: Any) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Template:
    """One session's EVALSHA command, cut where the event name and the data go."""

    head: bytes
    middle: bytes
    tail: bytes


class _ScriptWire:
    """The service's publish script, with the keys and arguments `Publisher` would send."""

    def __init__(self, plan: Plan) -> None:
        self._publisher = Publisher(
            cast(Any, _NoClient()), Keys(), session_ttl_s=plan.session_ttl_s,
            log_maxlen=plan.log_maxlen,
        )  # fmt: skip
        self.sha = _script_sha(Publisher.SCRIPT)
        self._templates: dict[str, _Template] = {}

    def _template(self, session_id: str) -> _Template:
        call = self._publisher.script_call(session_id, _EVENT_MARK, _DATA_MARK)
        keys, args = call.keys, call.args
        event_at, data_at = args.index(_EVENT_MARK), args.index(_DATA_MARK)
        if event_at > data_at:
            raise RuntimeError("Publisher's script arguments changed order: event after data")
        words = ["EVALSHA", self.sha, len(keys), *keys, *args]
        cut_event, cut_data = 3 + len(keys) + event_at, 3 + len(keys) + data_at
        encoded = [_bulk(_word(word)) for word in words]
        return _Template(
            b"*%d\r\n" % len(words) + b"".join(encoded[:cut_event]),
            b"".join(encoded[cut_event + 1 : cut_data]),
            b"".join(encoded[cut_data + 1 :]),
        )

    def command(self, session_id: str, event: bytes, data: bytes) -> bytes:
        t = self._templates.get(session_id)
        if t is None:
            t = self._templates[session_id] = self._template(session_id)
        return b"".join((t.head, _bulk(event), t.middle, _bulk(data), t.tail))

    def forget(self, session_id: str) -> None:
        self._templates.pop(session_id, None)

    def replies(self) -> _Replies:
        return cast(_Replies, hiredis.Reader())

    def ok(self, reply: Any) -> bool:
        return type(reply) is list and len(reply) == 2 and reply[0] == b"ok"


class HttpReplies:
    """Status codes of pipelined HTTP/1.1 responses, parsed as their bytes arrive.

    Bodies are framed by Content-Length (nchan's publisher replies always carry one); a
    response without one has no body, as a 204 or 304 would.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._statuses: list[int] = []

    def feed(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        while (end := buffer.find(b"\r\n\r\n", pos)) >= 0:
            head = buffer[pos:end].lower()
            if b"\r\ntransfer-encoding:" in head:
                raise ValueError("chunked publisher replies are not supported")
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if end + 4 + length > len(buffer):
                break
            self._statuses.append(int(head[9:12]))
            pos = end + 4 + length
        self._buffer = buffer[pos:]

    def gets(self) -> int | bool:
        return self._statuses.pop(0) if self._statuses else False


class _HttpWire:
    """nchan's publisher endpoint: POST the data, name the event in a header."""

    def __init__(self, plan: Plan) -> None:
        self._head = f"POST {plan.http_path}?id=".encode()
        self._host = f" HTTP/1.1\r\nHost: 127.0.0.1:{plan.http_port}\r\n".encode()

    def command(self, session_id: str, event: bytes, data: bytes) -> bytes:
        named = b"X-EventSource-Event: %b\r\n" % event if event else b""
        return b"%b%b%bContent-Length: %d\r\n%b\r\n%b" % (
            self._head,
            session_id.encode(),
            self._host,
            len(data),
            named,
            data,
        )

    def replies(self) -> _Replies:
        return HttpReplies()

    def ok(self, reply: Any) -> bool:
        return reply in (201, 202)


def _script_sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


class _Connection(asyncio.Protocol):
    """One raw connection: write a batch of requests, await that many replies."""

    def __init__(self, replies: _Replies) -> None:
        self._reader = replies
        self._transport: asyncio.Transport | None = None
        self._replies: list[Any] = []
        self._wanted = 0
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the server closed the connection")
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


async def _connect_redis(url: str) -> _Connection:
    """A raw connection to `url` (redis:// or unix://), authenticated, on its db, named."""
    parsed = urlparse(url)
    loop = asyncio.get_running_loop()
    if parsed.scheme == "unix":
        _, connection = await loop.create_unix_connection(
            lambda: _Connection(cast(_Replies, hiredis.Reader())), parsed.path
        )
    else:
        _, connection = await loop.create_connection(
            lambda: _Connection(cast(_Replies, hiredis.Reader())),
            parsed.hostname or "127.0.0.1", parsed.port or 6379,
        )  # fmt: skip
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


async def _connect_http(port: int) -> _Connection:
    _, connection = await asyncio.get_running_loop().create_connection(
        lambda: _Connection(HttpReplies()), "127.0.0.1", port
    )
    return connection


@dataclass
class _Publishing:
    """The child's state: its wire, its lanes and the running totals."""

    plan: Plan
    wire: _Wire
    connections: list[_Connection] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    # A stream's session ids not yet sent, and whether `end` has been read.
    pending: list[str] = field(default_factory=list)
    ended: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self, replies: list[Any]) -> None:
        report, ok = self.report, self.wire.ok
        report.batches += 1
        for reply in replies:
            if ok(reply):
                report.published += 1
            else:
                report.failures += 1
                report.failure = report.failure or f"unexpected reply: {reply!r}"

    async def lane(self, index: int, start: float) -> None:
        plan, connection, wire = self.plan, self.connections[index], self.wire
        lanes = len(self.connections)
        mine = plan.session_ids[index::lanes]
        per_seq = len(mine)
        total = per_seq * plan.events
        last_seq = plan.events - 1 if plan.finish_last else -1
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
                seq, which = divmod(k, per_seq)
                data = event_data(plan.first_seq + seq, now).encode()
                name = b"finish" if seq == last_seq else b""
                parts.append(wire.command(mine[which], name, data))
            self.check(await connection.request(b"".join(parts), count))
            sent += count

    async def stream_lane(self, index: int) -> None:
        """Publish event 0 to each session id as it arrives, batching what has queued."""
        connection, wire = self.connections[index], self.wire
        while True:
            if not self.pending:
                if self.ended:
                    return
                self.arrived.clear()
                await self.arrived.wait()
                continue
            batch = self.pending[:MAX_PACED_BATCH]
            del self.pending[:MAX_PACED_BATCH]
            data = event_data(0).encode()
            payload = b"".join(wire.command(sid, b"", data) for sid in batch)
            if isinstance(wire, _ScriptWire):
                for sid in batch:  # each stream session is published to once
                    wire.forget(sid)
            self.check(await connection.request(payload, len(batch)))


async def _prepare(plan: Plan) -> _Publishing:
    lanes = plan.lanes if plan.stream else max(1, min(plan.lanes, len(plan.session_ids)))
    if plan.wire == NCHAN_HTTP:
        publishing = _Publishing(plan, _HttpWire(plan))
        publishing.connections = list(
            await asyncio.gather(*(_connect_http(plan.http_port) for _ in range(lanes)))
        )
        return publishing
    if plan.wire != REDIS_SCRIPT:
        raise ValueError(f"unknown wire {plan.wire!r}")
    publishing = _Publishing(plan, _ScriptWire(plan))
    publishing.connections = list(
        await asyncio.gather(*(_connect_redis(plan.redis_url) for _ in range(lanes)))
    )
    (sha,) = await publishing.connections[0].request(
        _command("SCRIPT", "LOAD", Publisher.SCRIPT), 1
    )
    if isinstance(sha, Exception) or sha.decode() != _script_sha(Publisher.SCRIPT):
        raise RuntimeError(f"SCRIPT LOAD answered {sha!r}")
    return publishing


async def _publish(publishing: _Publishing, stdin: asyncio.StreamReader) -> Report:
    report = publishing.report

    async def show_progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            _say(str(report.published + report.failures))

    async def read_session_ids() -> None:
        while (line := await stdin.readline()) and line.strip() != b"end":
            publishing.pending += line.decode().split()
            publishing.arrived.set()
        publishing.ended = True
        publishing.arrived.set()

    helper = asyncio.create_task(read_session_ids() if publishing.plan.stream else show_progress())
    cpu_before = time.process_time()
    report.started_ns = time.monotonic_ns()
    start = report.started_ns / 1e9
    lanes = range(len(publishing.connections))
    try:
        if publishing.plan.stream:
            await asyncio.gather(*(publishing.stream_lane(i) for i in lanes))
        else:
            await asyncio.gather(*(publishing.lane(i, start) for i in lanes))
    finally:
        helper.cancel()
    report.finished_ns = time.monotonic_ns()
    report.cpu_s = time.process_time() - cpu_before
    for connection in publishing.connections:
        connection.close()
    return report


async def _stdin_reader() -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=2**24)
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer
    )
    return reader


async def _child() -> int:
    stdin = await _stdin_reader()
    plan = Plan(**json.loads(await stdin.readline()))
    publishing = await _prepare(plan)
    _say("ready")
    if (await stdin.readline()).strip() != b"go":
        return 1
    report = await _publish(publishing, stdin)
    _say("done " + json.dumps(asdict(report)))
    return 0


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
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_child())


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
        """Wait until its connections are up (and the script is loaded)."""
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await self._line()
        if line != "ready":
            raise RuntimeError(f"the publisher said {line!r} instead of ready")

    def _write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(data)

    async def run(self, advance: Callable[[int], None]) -> Report:
        """Publish the plan; `advance` is told how many events went out as they do."""
        self._write(b"go\n")
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

    def go(self) -> None:
        """A stream: start taking session ids."""
        self._write(b"go\n")

    def send(self, session_ids: list[str]) -> None:
        """A stream: publish event 0 to each of these sessions now."""
        self._write(" ".join(session_ids).encode() + b"\n")

    async def end(self) -> Report:
        """A stream: no more session ids; wait for the last replies and the report."""
        self._write(b"end\n")
        while not (line := await self._line()).startswith("done "):
            pass
        self._finished = True
        return Report(**json.loads(line[5:]))

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
        publisher._write(json.dumps(asdict(plan)).encode() + b"\n")
        yield publisher
    finally:
        await publisher.stop()


if __name__ == "__main__":
    sys.exit(main())
