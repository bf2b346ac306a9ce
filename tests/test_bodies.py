"""Decoding request bodies by their Content-Encoding: strict, bounded, no server needed."""

from __future__ import annotations

import gzip
import zlib

import pytest

from service.bodies import DecodedBodyTooLarge, UnsupportedEncoding, decode_body
from service.errors import MalformedBody

TEXT = b'{"data": "hello"}' * 20
LIMIT = 10_000


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("", TEXT),
        ("identity", TEXT),
        ("gzip", gzip.compress(TEXT)),
        ("x-gzip", gzip.compress(TEXT)),
        ("GZip", gzip.compress(TEXT)),
        ("deflate", zlib.compress(TEXT)),
        ("deflate", raw_deflate(TEXT)),
        ("deflate, gzip", gzip.compress(zlib.compress(TEXT))),
        ("gzip, identity", gzip.compress(TEXT)),
    ],
)
def test_bodies_decode(encoding: str, body: bytes) -> None:
    assert decode_body(body, encoding, LIMIT) == TEXT


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("deflate", b"not compressed at all"),
        ("gzip", b"not compressed at all"),
        ("gzip", gzip.compress(TEXT)[:-6]),
        ("deflate", zlib.compress(TEXT)[:-6]),
        ("deflate", raw_deflate(TEXT)[:-3]),
        ("gzip", gzip.compress(TEXT) + b"trailing"),
        ("deflate", zlib.compress(TEXT) + b"trailing"),
        ("gzip", b""),
    ],
)
def test_undecodable_bodies_are_refused(encoding: str, body: bytes) -> None:
    with pytest.raises(MalformedBody):
        decode_body(body, encoding, LIMIT)


def test_the_limit_applies_to_the_decoded_size() -> None:
    bomb = gzip.compress(b"\0" * 10_000_000)
    assert len(bomb) < 20_000
    with pytest.raises(DecodedBodyTooLarge):
        decode_body(bomb, "gzip", 1_000_000)
    assert decode_body(gzip.compress(b"x" * 1000), "gzip", 1000) == b"x" * 1000


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br", "x" * 500])
def test_other_encodings_are_a_415_naming_what_is_accepted(encoding: str) -> None:
    with pytest.raises(UnsupportedEncoding) as refused:
        decode_body(b"anything", encoding, LIMIT)
    assert refused.value.status == 415
    assert refused.value.headers == {"Accept-Encoding": "gzip, deflate"}
    assert len(refused.value.detail) < 100
