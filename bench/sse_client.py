"""A light SSE client: one raw asyncio Protocol per stream, parsing the bytes itself.

A full HTTP client per stream would cost the generator more than the worker under test
spends on the stream, so each connection is a Protocol that sends one HTTP/1.1 GET and
parses the status line, chunked transfer coding and `id:`/`event:`/`data:` lines directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing
from collections.abc import Callable
from dataclasses import dataclass

# Called for each complete event with (stream, id, event name, data); names are b"" if absent.
EventSink = Callable[["SSEStream", bytes, bytes, bytes], None]


class SSEStream(asyncio.Protocol):
    """One GET on one TCP connection, fed to `sink` event by event until either side closes."""

    def __init__(self, request: bytes, sink: EventSink, tag: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.tag = tag
        self.status = 0
        self.events = 0
        self.retry_ms: int | None = None  # the last `retry:` the server sent
        self.headers_received: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._request = request
        self._sink = sink
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._in_body = False
        self._chunked = False
        self._chunk_left = 0  # body bytes left in the current chunk
        self._skip = 0  # CRLF bytes still to skip after a chunk's data
        self._size_line = b""  # an incomplete chunk-size line
        self._text = b""  # SSE text after the last complete line
        self._id = b""
        self._event = b""
        self._data: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = typing.cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def close(self) -> None:
        """Hang up (the server sees the client go)."""
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.headers_received.done():
            self.headers_received.set_result(self.status)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            data = self._read_head(data)
            if not self._in_body:
                return
        if self._chunked:
            self._feed_chunked(data)
        elif data:
            self._feed_text(data)

    def _read_head(self, data: bytes) -> bytes:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            return b""
        self._head = b""
        lines = head[:end].split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
        self._in_body = True
        if not self.headers_received.done():
            self.headers_received.set_result(self.status)
        return head[end + 4 :]

    def _feed_chunked(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
            elif self._chunk_left:
                step = min(self._chunk_left, size - pos)
                self._feed_text(data[pos : pos + step])
                self._chunk_left -= step
                pos += step
                if not self._chunk_left:
                    self._skip = 2
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._size_line += data[pos:]
                    return
                line = self._size_line + data[pos:end]
                self._size_line = b""
                pos = end + 2
                self._chunk_left = int(line.split(b";", 1)[0], 16)
                if not self._chunk_left:  # the last chunk: the response is complete
                    self.close()
                    return

    def _feed_text(self, data: bytes) -> None:
        text = self._text + data if self._text else data
        lines = text.split(b"\n")
        self._text = lines.pop()
        for line in lines:
            if not line:
                if self._data:
                    self.events += 1
                    self._sink(self, self._id, self._event, b"\n".join(self._data))
                self._event = b""
                self._data = []
            elif line[0] != 58:  # not a ":" comment
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    self._data.append(value)
                elif name == b"id":
                    self._id = value
                elif name == b"event":
                    self._event = value
                elif name == b"retry" and value.isdigit():
                    self.retry_ms = int(value)


def get_request(path: str, port: int) -> bytes:
    """The bytes of a minimal HTTP/1.1 GET for an event stream."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()


async def open_stream(port: int, path: str, sink: EventSink, tag: int = 0) -> SSEStream:
    """Connect and send the GET; await `headers_received` to know the stream is live."""
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(
        lambda: SSEStream(get_request(path, port), sink, tag), "127.0.0.1", port
    )
    return stream


@dataclass(frozen=True, slots=True)
class PlainResponse:
    """A small non-streaming response."""

    status: int
    body: bytes


async def fetch(
    port: int, path: str, timeout_s: float = 10.0, method: str = "GET", body: bytes = b""
) -> PlainResponse:
    """One request with `Connection: close`, read to the end (only for small replies)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            writer.write(request.encode() + body)
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return PlainResponse(status, body)


RETRIES_503 = 5
RETRY_DELAY_S = 1.0


@dataclass
class Opened:
    """The streams a batch of connects produced, and how many of them failed."""

    streams: list[SSEStream]
    failed: int
    failure: str
    retries: int = 0  # connects answered 503 (busy, Retry-After) and tried again


async def open_many(
    port: int,
    /,
    paths: list[str],
    sink: EventSink,
    *,
    concurrency: int = 200,
    on_done: Callable[[int], None] | None = None,
    timeout_s: float = 30.0,
) -> Opened:
    """Open one stream per path, at most `concurrency` connects in flight; keep the 200s.

    The bound keeps connect bursts inside the server's listen backlog, so SYN retries never
    show up as latency.
    """
    gate = asyncio.Semaphore(concurrency)
    streams: list[SSEStream] = []
    failures: list[str] = []

    retries = 0

    async def one(tag: int, path: str) -> None:
        nonlocal retries
        for attempt in range(RETRIES_503 + 1):
            async with gate:
                try:
                    async with asyncio.timeout(timeout_s):
                        stream = await open_stream(port, path, sink, tag)
                        status = await stream.headers_received
                except (OSError, TimeoutError) as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    break
                if status == 200:
                    streams.append(stream)
                    break
                stream.close()
            # A 503 carries Retry-After: the worker is briefly busy. Retry as EventSource would.
            if status != 503 or attempt == RETRIES_503:
                failures.append(f"HTTP {status}")
                break
            retries += 1
            await asyncio.sleep(RETRY_DELAY_S)
        if on_done is not None:
            on_done(1)

    await asyncio.gather(*(one(tag, path) for tag, path in enumerate(paths)))
    return Opened(streams, len(failures), failures[0] if failures else "", retries)


async def close_all(streams: list[SSEStream], timeout_s: float = 30.0) -> None:
    """Hang up every stream and wait until the connections are gone."""
    for stream in streams:
        stream.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            for stream in streams:
                await stream.closed
