"""Request bodies: read within a deadline; with a `Content-Encoding`, decoded here, strictly
and within a size limit.

aiohttp's own decoding is switched off (`auto_decompress=False`, see protocol.py). Its
decoder reports a truncated deflate stream only when the body ends, from inside the parser,
where the error never reaches the handler reading the body: the handler waited for the rest
of a body that had already arrived, until the client gave up (aiohttp 3.14). It also accepts
a truncated gzip stream as complete. Decoding a body already read, in one call, has neither
problem, and the limit applies to the decoded size, so a small compressed body cannot expand
past `max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from .connection_stats import ConnectionStats
from .errors import MalformedBody, RequestTimeout, ServiceError

# What this worker decodes; the 415 answer lists them (RFC 7694).
ACCEPTED_ENCODINGS = "gzip, deflate"
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


class UnsupportedEncoding(ServiceError):
    """The body's `Content-Encoding` is not one this worker decodes."""

    status = 415
    code = "unsupported_media_type"


class DecodedBodyTooLarge(ServiceError):
    """The body is larger than `max_body_bytes` once decoded."""

    status = 413
    code = "payload_too_large"


async def read_body(request: web.Request, timeout_s: float, stats: ConnectionStats) -> bytes:
    """The whole raw body, or RequestTimeout (408, the connection closes) after `timeout_s`.

    A client trickling its body a byte at a time would otherwise hold the request and its
    connection for as long as it likes.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        stats.body_timeouts += 1
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None


def decode_body(body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """`body` with its `Content-Encoding` undone; at most `max_bytes` of result."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    # Codings are listed in the order they were applied: undo them from the last.
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, _GZIP_WBITS, max_bytes)
        elif coding == "deflate":
            # RFC 9110 means zlib-wrapped data; some clients send raw deflate, as aiohttp and
            # urllib3 accept too. The zlib header tells them apart.
            wbits = _ZLIB_WBITS if _has_zlib_header(body) else _RAW_DEFLATE_WBITS
            body = _inflate(body, wbits, max_bytes)
        else:
            raise UnsupportedEncoding(
                f"Content-Encoding {coding[:32]!r} is not supported; use {ACCEPTED_ENCODINGS}",
                headers={"Accept-Encoding": ACCEPTED_ENCODINGS},
            )
    return body


def _has_zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    decompressor = zlib.decompressobj(wbits)
    try:
        decoded = decompressor.decompress(data, max_bytes + 1)
    except zlib.error:
        raise _undecodable() from None
    if len(decoded) > max_bytes:
        raise DecodedBodyTooLarge(f"the decoded body is larger than {max_bytes} bytes")
    if not decompressor.eof or decompressor.unused_data:
        # Truncated, or followed by bytes that are not part of the stream.
        raise _undecodable()
    return decoded


def _undecodable() -> MalformedBody:
    return MalformedBody("the body cannot be decoded with the Content-Encoding it declares")
