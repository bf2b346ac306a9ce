"""HTTP/1.1 chunked transfer coding of pre-encoded SSE frames, and writing them directly.

A stream response is chunked; a frame framed here once can be written to any number of
sockets as is, exactly as aiohttp would have framed it.
"""

from __future__ import annotations

import asyncio


def http_chunk(body: bytes) -> bytes:
    """`body` as one chunk: its size in hex, CRLF, the bytes, CRLF (never the empty last chunk)."""
    if not body:
        raise ValueError("an empty chunk would end the response body")
    return b"%x\r\n%b\r\n" % (len(body), body)


class ChunkWriter:
    """Pre-framed chunks for one client's socket, written together once per loop pass.

    Everything handed over while the hub distributes one batch of Redis messages leaves in
    one system call, after the batch: a stream that gets many events at once (a broadcast at
    full speed) pays one write for them, not one each.
    """

    __slots__ = ("_chunks", "_limit", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.WriteTransport, limit: int) -> None:
        """`limit`: bytes the socket may hold unsent, collected chunks included."""
        self._transport = transport
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def has_room(self) -> bool:
        """The socket is open and keeps up: it holds no more than `limit` unsent bytes."""
        transport = self._transport
        return (
            not transport.is_closing()
            and transport.get_write_buffer_size() + self._size <= self._limit
        )

    def add(self, chunk: bytes) -> None:
        """Queue `chunk` for the write at the end of this loop pass."""
        if not self._chunks:
            loop = self._loop
            if loop is None:  # looked up once: get_running_loop() costs a getpid() call
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)
        self._chunks.append(chunk)
        self._size += len(chunk)

    def flush(self) -> None:
        """Write what is queued now (the stream's task does before writing anything itself)."""
        chunks = self._chunks
        if not chunks:
            return
        self._chunks = []
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
