"""Every part of a request has a deadline: its head, its body, the idle time between requests.

A client that trickles a request line, headers or a body, or holds a connection without a
request, is answered 408 in the JSON error shape (when it had begun a request) and its
connection is closed, so slow clients cannot hold a worker's connections.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path

import pytest

from service.app import create_app
from service.redis.connections import RedisOpener
from service.settings import Settings

from app_clients import MakeSettings
from raw_http import Address, RawResponse, serve_edge, split_responses

TOKEN = "deadline-token-0123456789"
HEADER_TIMEOUT_S = 0.5
KEEPALIVE_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
# Far beyond every deadline above: a connection still open by then was not closed by one.
WAIT_S = 8.0
ROOT = Path(__file__).resolve().parent.parent
PUBLISH_HEAD = (
    "POST /sse/sessions/s1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    f"Authorization: Bearer {TOKEN}\r\n"
)


@pytest.fixture
async def edge(make_settings: MakeSettings, fake_opener: RedisOpener) -> AsyncIterator[Address]:
    """The app on the runner `python -m service` uses, with short deadlines."""
    settings = make_settings(
        publish_tokens=[TOKEN],
        demo_runs=False,
        header_timeout_s=HEADER_TIMEOUT_S,
        keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    async with serve_edge(create_app(settings, fake_opener)) as address:
        yield address


async def trickle(address: Address, first: bytes, *, drip: bytes = b"") -> tuple[bytes, float]:
    """Send `first`, then `drip` every 0.1 s; everything received until the server closes,
    and how long that took. Fails if the server is still there after WAIT_S."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    started = time.monotonic()
    received = b""
    try:
        writer.write(first)
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 0.1)
                except TimeoutError:
                    if drip:
                        writer.write(drip)
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    return received, time.monotonic() - started


def request_timeout(response: RawResponse) -> dict[str, str]:
    """The JSON error of a 408 that closes the connection."""
    assert response.status == 408
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, str] = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "request_timeout"
    return body


async def test_a_trickled_request_head_is_answered_408_and_closed(edge: Address) -> None:
    received, took_s = await trickle(edge, b"GET /healthz HTTP/1.1\r\n", drip=b"X-A: b\r\n")
    assert "headers" in request_timeout(*split_responses(received))["detail"]
    assert took_s >= HEADER_TIMEOUT_S


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    edge: Address,
) -> None:
    received, took_s = await trickle(edge, b"")
    assert received == b""
    assert took_s >= HEADER_TIMEOUT_S


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_an_idle_kept_alive_connection_closes_after_the_keepalive_timeout(
    edge: Address,
) -> None:
    received, took_s = await trickle(edge, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    (response,) = split_responses(received)
    assert response.status == 200
    # Open past the head deadline (it ran from the connection's start, and was met).
    assert took_s >= KEEPALIVE_TIMEOUT_S


async def test_the_next_request_head_on_a_kept_alive_connection_has_the_same_deadline(
    edge: Address,
) -> None:
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n"
    received, _ = await trickle(edge, first, drip=b"X-A: b\r\n")
    ok, late = split_responses(received)
    assert ok.status == 200
    assert "headers" in request_timeout(late)["detail"]


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_a_trickled_body_is_answered_408_and_closed(edge: Address) -> None:
    head = f"{PUBLISH_HEAD}Content-Length: 100000\r\n\r\n{{".encode()
    received, took_s = await trickle(edge, head, drip=b" ")
    assert "body" in request_timeout(*split_responses(received))["detail"]
    # Closed right after the answer: not read on for aiohttp's lingering time (10 s).
    assert took_s < BODY_TIMEOUT_S + 5


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_a_trickled_chunked_body_is_answered_408_and_closed(edge: Address) -> None:
    head = f"{PUBLISH_HEAD}Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n".encode()
    received, _ = await trickle(edge, head, drip=b"1\r\n \r\n")
    assert "body" in request_timeout(*split_responses(received))["detail"]


async def test_a_body_in_time_is_published(edge: Address) -> None:
    body = json.dumps({"data": "hello"}).encode()
    head = f"{PUBLISH_HEAD}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    received, _ = await trickle(edge, head + body)
    (response,) = split_responses(received)
    assert response.status == 202


def test_nginx_drops_idle_upstream_connections_before_the_worker_does() -> None:
    """Else nginx may send a request on a connection the worker is closing (a 502 for a POST)."""
    conf = (ROOT / "config" / "nginx.conf").read_text()
    upstream = re.search(r"upstream workers \{(.*?)\n    \}", conf, re.DOTALL)
    assert upstream is not None
    timeout = re.search(r"^\s*keepalive_timeout (\d+)s;", upstream.group(1), re.MULTILINE)
    assert timeout is not None, "the upstream block sets no keepalive_timeout (nginx: 60 s)"
    assert int(timeout.group(1)) < Settings().keepalive_timeout_s
