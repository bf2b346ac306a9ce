"""The bytes on the client's socket, read raw: chunked HTTP/1.1, plain HTTP/1.0, a stalled reader.

Live events reach a parked HTTP/1.1 stream as pre-framed chunks written straight to its
socket, interleaved with aiohttp's own writes; these tests decode what a client receives
with their own chunk reader and check the events are whole, complete and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis

from service.keys import Keys
from service.mailbox import InboxItem, Incoming, StreamEnd
from service.publisher import Publisher
from service.resources import hub_key, stream_metrics_key
from service.stream import DIRECT_WRITE_BUFFER_LIMIT, EventStream

from app_clients import AppClient, MakeSettings, StartClient
from sse_reader import STREAM_OPENED, ReceivedEvent, SSEParser, collect
from waiting import wait_for

pytestmark = pytest.mark.redis


@dataclass
class DirectLog:
    """What the streams' direct-write handler did."""

    calls: int = 0
    written: int = 0
    declined_with_buffered: list[int] = field(default_factory=list)


@pytest.fixture
def direct_log(monkeypatch: pytest.MonkeyPatch) -> DirectLog:
    """Watch EventStream._write_live, so a test knows which path its events took."""
    log = DirectLog()
    original = EventStream._write_live

    def watched(stream: EventStream, item: InboxItem) -> bool:
        log.calls += 1
        taken = original(stream, item)
        transport = stream._connection
        if taken:
            log.written += 1
        elif type(item) is Incoming and transport is not None and stream._live is not None:
            log.declined_with_buffered.append(transport.get_write_buffer_size())
        return taken

    monkeypatch.setattr(EventStream, "_write_live", watched)
    return log


@pytest.fixture
async def publisher(redis_client: redis.Redis) -> Publisher:
    return Publisher(redis_client, Keys(), session_ttl_s=30, log_maxlen=10_000)


StartWorker = Callable[..., Awaitable[Any]]


@pytest.fixture
def start_worker(
    start_client: StartClient, make_settings: MakeSettings, redis_url: str
) -> StartWorker:
    """Start a worker on the real Redis, without demo runs, with these settings changed."""

    async def start(**overrides: Any) -> Any:
        settings = make_settings(redis_url=redis_url, demo_runs=False, **overrides)
        return await start_client(settings)

    return start


class RawClient:
    """One HTTP connection driven by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, client: AppClient, receive_buffer: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connecting, so the advertised window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(
            sock, (client.server.host, client.server.port)
        )
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def request(self, target: str, version: str = "1.1", extra: str = "") -> None:
        self.writer.write(f"GET {target} HTTP/{version}\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        await self.writer.drain()

    async def head(self) -> tuple[str, dict[str, str]]:
        """The status line and the headers (names lower-cased) of the next response."""
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status, *lines = raw.decode("latin-1").split("\r\n")[:-2]
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated header {name}"
            headers[name.lower()] = value.strip()
        return status, headers

    async def chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None after the last chunk and its CRLF."""
        size_line = await self.reader.readuntil(b"\r\n")
        size_text = size_line[:-2]
        assert size_text, "a chunk size line must not be empty"
        assert all(c in b"0123456789abcdef" for c in size_text), size_line
        size = int(size_text, 16)
        if size == 0:
            assert await self.reader.readexactly(2) == b"\r\n"
            return None
        data = await self.reader.readexactly(size + 2)
        assert data.endswith(b"\r\n"), "chunk data must be followed by CRLF"
        return data[:-2]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


OpenRaw = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def open_raw() -> AsyncIterator[OpenRaw]:
    """`RawClient.open`, with every client closed after the test."""
    opened: list[RawClient] = []

    async def open_one(client: AppClient, receive_buffer: int | None = None) -> RawClient:
        raw = await RawClient.open(client, receive_buffer)
        opened.append(raw)
        return raw

    yield open_one
    for raw in opened:
        await raw.close()


async def read_chunked_events(raw: RawClient) -> tuple[list[ReceivedEvent], list[bytes]]:
    """Every event of a chunked SSE body, up to its last chunk, and the chunks themselves."""
    parser = SSEParser()
    events: list[ReceivedEvent] = []
    chunks: list[bytes] = []
    while (chunk := await raw.chunk()) is not None:
        chunks.append(chunk)
        events.extend(parser.feed(chunk.decode()))
    return events, chunks


def normalised(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


def sample_data(n: int) -> str:
    if n == 500:
        return f"{n} " + "large " * 40_000  # one event far above the direct-write limit
    if n % 10 == 3:
        return f"{n} first\r\nsecond\rthird\nfourth\r\n"
    return f"{n} 结束"


async def test_http11_gets_a_valid_chunked_body_with_every_event_in_order(
    start_worker: StartWorker,
    publisher: Publisher,
    open_raw: OpenRaw,
    direct_log: DirectLog,
) -> None:
    client = await start_worker()
    raw = await open_raw(client)
    await raw.request("/sse/connect?sessionId=chunky")
    status, headers = await raw.head()
    assert status == "HTTP/1.1 200 OK"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert await raw.chunk() == b"retry: 500\n: connected\n"

    count = 1000
    reading = asyncio.create_task(read_chunked_events(raw))
    sent = [sample_data(n) for n in range(count)]
    for data in sent:
        await publisher.publish("chunky", "", data)
    await publisher.publish("chunky", "finish", "done")
    async with asyncio.timeout(15):
        events, chunks = await reading

    assert [e.data for e in events] == [normalised(d) for d in sent] + ["done"]
    assert [e.event for e in events] == ["message"] * count + ["finish"]
    ids = [tuple(int(p) for p in e.id.split("-")) for e in events]
    assert ids == sorted(set(ids))
    # Every write, direct or through aiohttp, is whole frames: no chunk splits an event.
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)
    assert direct_log.written > count // 2  # the parked stream wrote most events itself

    # The body ended exactly where the client thinks it did: the connection takes another
    # request and its response parses.
    await raw.request("/sse/getSessionId")
    status, headers = await raw.head()
    assert status == "HTTP/1.1 200 OK"
    body = await raw.reader.readexactly(int(headers["content-length"]))
    assert len(body) == 22
    assert body.isalnum()


async def test_http10_gets_plain_sse_without_chunking_and_the_connection_closes(
    start_worker: StartWorker,
    publisher: Publisher,
    open_raw: OpenRaw,
    direct_log: DirectLog,
) -> None:
    client = await start_worker()
    raw = await open_raw(client)
    await raw.request("/sse/connect?sessionId=oldtimer", version="1.0")
    status, headers = await raw.head()
    assert status == "HTTP/1.0 200 OK"
    assert "transfer-encoding" not in headers
    assert "content-length" not in headers
    assert await raw.reader.readuntil(STREAM_OPENED) == b"retry: 500\n: connected\n"

    sent = [sample_data(n) for n in range(1, 60)]
    for data in sent:
        await publisher.publish("oldtimer", "", data)
    await publisher.publish("oldtimer", "finish", "done")
    async with asyncio.timeout(5):
        body = await raw.reader.read()  # to the end: the server closes the connection
    assert raw.reader.at_eof()
    events = SSEParser().feed(body.decode())
    assert [e.data for e in events] == [normalised(d) for d in sent] + ["done"]
    assert events[-1].event == "finish"
    assert b"\r\n" not in body  # no chunk framing (frames end lines with LF only)
    assert direct_log.calls == 0  # an unchunked stream is written by its task only


async def test_http10_keep_alive_request_still_sees_the_stream_end(
    start_worker: StartWorker, publisher: Publisher, open_raw: OpenRaw
) -> None:
    # The body has neither a length nor chunks, so only the connection's close can end it.
    client = await start_worker()
    raw = await open_raw(client)
    await raw.request(
        "/sse/connect?sessionId=oldkeep", version="1.0", extra="Connection: keep-alive\r\n"
    )
    status, headers = await raw.head()
    assert status == "HTTP/1.0 200 OK"
    assert "content-length" not in headers
    await raw.reader.readuntil(STREAM_OPENED)
    await publisher.publish("oldkeep", "finish", "done")
    async with asyncio.timeout(2):
        body = await raw.reader.read()
    assert SSEParser().feed(body.decode())[-1].data == "done"


async def stall_until_dropped(
    client: AppClient, publisher: Publisher, session_id: str, open_raw: OpenRaw
) -> tuple[RawClient, list[str]]:
    """A client that reads its headers and first frame, then nothing: publish until the hub
    drops it. Returns it and the data published."""
    stalled = await open_raw(client, receive_buffer=4096)
    await stalled.request(f"/sse/connect?sessionId={session_id}")
    status, _ = await stalled.head()
    assert status == "HTTP/1.1 200 OK"
    await stalled.chunk()
    hub = client.app[hub_key]
    payload = "y" * 4096
    sent: list[str] = []
    # Bounded: the kernel's socket buffers hold a few MiB at most; 64 MiB is far beyond.
    while hub.stats.slow_listeners_dropped == 0 and len(sent) < 16_000:
        sent.append(f"{len(sent)} {payload}")
        await publisher.publish(session_id, "", sent[-1])
    assert hub.stats.slow_listeners_dropped == 1
    return stalled, sent


async def test_a_stalled_reader_is_dropped_and_the_worker_serves_the_rest(
    start_worker: StartWorker,
    publisher: Publisher,
    open_raw: OpenRaw,
    direct_log: DirectLog,
) -> None:
    client = await start_worker(listener_queue_size=8)
    app = client.app
    hub, metrics = app[hub_key], app[stream_metrics_key]
    idle_listeners = hub.listener_count
    reader = await open_raw(client)
    await reader.request("/sse/connect?sessionId=shared")
    await reader.head()
    await reader.chunk()
    reading = asyncio.create_task(read_chunked_events(reader))

    stalled, sent = await stall_until_dropped(client, publisher, "shared", open_raw)
    # It was dropped only after its socket held more than the direct-write limit unsent.
    assert max(direct_log.declined_with_buffered) > DIRECT_WRITE_BUFFER_LIMIT
    assert len(sent) * 4096 > DIRECT_WRITE_BUFFER_LIMIT
    for n in range(20):
        sent.append(f"after {n}")
        await publisher.publish("shared", "", sent[-1])
    await publisher.publish("shared", "finish", "done")
    async with asyncio.timeout(15):
        events, _ = await reading
    assert [e.data for e in events] == [*sent, "done"]
    assert hub.connected

    # A new client of a new session is served as usual.
    fresh = await client.get("/sse/connect", params={"sessionId": "fresh"})
    await fresh.content.readuntil(STREAM_OPENED)
    await publisher.publish("fresh", "finish", "hello")
    assert [e.data for e in await collect(fresh, timeout_s=5)] == ["hello"]

    # Once the stalled client hangs up, nothing of its stream is left behind.
    await stalled.close()

    async def released() -> bool:
        return bool(metrics.open_count == 0 and hub.listener_count == idle_listeners)

    await wait_for(released)


async def test_a_stalled_reader_dropped_as_slow_has_its_stream_ended(
    start_worker: StartWorker, publisher: Publisher, open_raw: OpenRaw
) -> None:
    # The client keeps its socket open and never reads again: the worker must not keep its
    # stream, listener and connection slot for as long as the client likes.
    client = await start_worker(listener_queue_size=8)
    metrics = client.app[stream_metrics_key]
    await stall_until_dropped(client, publisher, "stuck", open_raw)

    async def ended_as_slow() -> bool:
        return bool(metrics.ended(StreamEnd.SLOW) == 1 and metrics.open_count == 0)

    await wait_for(ended_as_slow, timeout_s=2)
