"""HTTP/1.1 chunk framing of pre-encoded frames (exact bytes, a body that decodes back), and
the writer that sends them to a socket once per loop pass."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.chunked import ChunkWriter, http_chunk
from service.sse import Event

LAST_CHUNK = b"0\r\n\r\n"


def decode_chunked(body: bytes) -> list[bytes]:
    """The chunks of a complete chunked body (RFC 9112 §7.1, no extensions or trailers)."""
    chunks: list[bytes] = []
    position = 0
    while True:
        line_end = body.index(b"\r\n", position)
        size_text = body[position:line_end]
        assert size_text, "a chunk size line must not be empty"
        assert all(c in b"0123456789abcdefABCDEF" for c in size_text), size_text
        size = int(size_text, 16)
        start = line_end + 2
        if size == 0:
            assert body[start:] == b"\r\n", "the last chunk ends the body with CRLF"
            return chunks
        end = start + size
        assert body[end : end + 2] == b"\r\n", "a chunk's data is followed by CRLF"
        chunks.append(body[start:end])
        position = end + 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"x", b"1\r\nx\r\n"),
        (b"data: hi\n\n", b"a\r\ndata: hi\n\n\r\n"),
        (b"y" * 15, b"f\r\n" + b"y" * 15 + b"\r\n"),
        (b"y" * 16, b"10\r\n" + b"y" * 16 + b"\r\n"),
        (b"z" * 255, b"ff\r\n" + b"z" * 255 + b"\r\n"),
        (b"z" * 256, b"100\r\n" + b"z" * 256 + b"\r\n"),
        (b"w" * 65536, b"10000\r\n" + b"w" * 65536 + b"\r\n"),
    ],
)
def test_chunk_bytes_are_hex_size_crlf_data_crlf(body: bytes, expected: bytes) -> None:
    assert http_chunk(body) == expected


def test_the_size_counts_bytes_not_characters() -> None:
    frame = Event(data="结束!!").encode()  # 8 bytes of UTF-8 in 4 characters
    assert len(frame) == 16
    assert http_chunk(frame) == b"10\r\n" + frame + b"\r\n"


def test_an_empty_chunk_is_refused() -> None:
    # It would be the last-chunk marker: it would end the response body.
    with pytest.raises(ValueError, match="empty"):
        http_chunk(b"")


def test_a_body_may_contain_crlf_and_the_terminator_itself() -> None:
    body = b"0\r\n\r\n\r\n"
    assert decode_chunked(http_chunk(body) + LAST_CHUNK) == [body]


@given(st.lists(st.binary(min_size=1, max_size=600), max_size=20))
def test_concatenated_chunks_decode_back_to_the_bodies(bodies: list[bytes]) -> None:
    encoded = b"".join(http_chunk(body) for body in bodies) + LAST_CHUNK
    assert decode_chunked(encoded) == bodies


def test_the_decoder_rejects_a_misframed_chunk() -> None:
    # The decoder in this file must be able to fail, or the tests above prove nothing.
    with pytest.raises(AssertionError):
        decode_chunked(b"2\r\nabc\r\n" + LAST_CHUNK)
    with pytest.raises(AssertionError):
        decode_chunked(b"3\r\nabc\r\n0\r\n")


class _Socket:
    """The part of a transport a ChunkWriter uses, recording each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.writes.append(data)


async def test_chunks_added_in_one_loop_pass_leave_in_one_write() -> None:
    socket = _Socket()
    writer = ChunkWriter(socket, limit=1024)  # type: ignore[arg-type]
    writer.add(b"a")
    writer.add(b"b")
    assert socket.writes == []  # not before the pass ends
    await asyncio.sleep(0)
    writer.add(b"c")
    await asyncio.sleep(0)
    assert socket.writes == [b"ab", b"c"]


async def test_an_explicit_flush_writes_at_once_and_the_scheduled_one_finds_nothing() -> None:
    socket = _Socket()
    writer = ChunkWriter(socket, limit=1024)  # type: ignore[arg-type]
    writer.add(b"a")
    writer.flush()
    await asyncio.sleep(0)
    assert socket.writes == [b"a"]


async def test_room_counts_the_socket_buffer_and_the_queued_chunks() -> None:
    socket = _Socket()
    writer = ChunkWriter(socket, limit=10)  # type: ignore[arg-type]
    socket.buffered = 6
    assert writer.has_room()
    writer.add(b"1234")  # 6 + 4 = the limit: still room
    assert writer.has_room()
    writer.add(b"5")
    assert not writer.has_room()
    writer.flush()
    socket.buffered = 0
    assert writer.has_room()
    socket.closing = True
    assert not writer.has_room()


async def test_nothing_is_written_to_a_socket_that_closed_meanwhile() -> None:
    socket = _Socket()
    writer = ChunkWriter(socket, limit=1024)  # type: ignore[arg-type]
    writer.add(b"a")
    socket.closing = True
    await asyncio.sleep(0)
    assert socket.writes == []
