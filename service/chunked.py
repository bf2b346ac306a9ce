"""HTTP/1.1 chunked transfer coding of pre-encoded SSE frames.

A stream response is chunked; a frame framed here once can be written to any number of
sockets as is, exactly as aiohttp would have framed it, one chunk per write.
"""

from __future__ import annotations


def http_chunk(body: bytes) -> bytes:
    """`body` as one chunk: its size in hex, CRLF, the bytes, CRLF (never the empty last chunk)."""
    if not body:
        raise ValueError("an empty chunk would end the response body")
    return b"%x\r\n%b\r\n" % (len(body), body)
