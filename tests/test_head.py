"""HEAD on every route: headers only, and the next request on the connection still parses.

A stream writes its events straight to the socket, past aiohttp's HEAD handling, so HEAD on
the stream (and on the id issuer, which would store a session) is refused with 405 before
any handler runs: no session, no run, no body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from service.app import create_app
from service.redis.connections import RedisOpener

from app_clients import MakeSettings
from raw_http import Address, exchange, serve_edge, split_responses

TOKEN = "head-token-0123456789abcdef"
READ_ONLY_PATHS = [
    "/",
    "/app.js",
    "/style.css",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/sse/sessions/some-session",
]
REFUSED_PATHS = ["/sse/connect?sessionId=head-probe", "/sse/getSessionId"]
NEXT = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def app(make_settings: MakeSettings, fake_opener: RedisOpener) -> web.Application:
    return create_app(make_settings(publish_tokens=[TOKEN]), fake_opener)


@pytest.fixture
async def edge(app: web.Application) -> AsyncIterator[Address]:
    async with serve_edge(app) as address:
        yield address


@pytest.fixture
async def inspector(fake_opener: RedisOpener, make_settings: MakeSettings) -> AsyncIterator[Any]:
    redis = await fake_opener(make_settings())
    yield redis
    await redis.aclose()


def test_the_lists_cover_every_get_route(app: web.Application) -> None:
    routed = {
        route.resource.canonical
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    }
    listed = {path.split("?")[0] for path in READ_ONLY_PATHS + REFUSED_PATHS}
    listed |= {"/{name}", "/sse/sessions/{sessionId}"}  # app.js and style.css; any session
    assert routed <= listed


async def head_then_next(edge: Address, path: str, headers: str = "") -> list[Any]:
    head = f"HEAD {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    received = await exchange(edge, head + NEXT, responses=2, head_only=frozenset({0}))
    answers = split_responses(received, head_only=frozenset({0}))
    assert len(answers) == 2, received
    assert (answers[1].status, answers[1].json()) == (200, {"status": "ok"})
    return answers


@pytest.mark.parametrize("path", READ_ONLY_PATHS)
async def test_head_on_a_read_only_route_is_headers_only(edge: Address, path: str) -> None:
    headers = f"Authorization: Bearer {TOKEN}\r\n" if path.startswith("/sse/") else ""
    head, _ = await head_then_next(edge, path, headers)
    assert head.status in (200, 404)  # the session API's 404: that session does not exist
    assert head.body == b""


@pytest.mark.parametrize("path", REFUSED_PATHS)
async def test_head_on_the_stream_and_the_id_issuer_is_405_without_side_effects(
    edge: Address, inspector: Any, path: str
) -> None:
    head, _ = await head_then_next(edge, path)
    assert head.status == 405
    assert head.headers["content-type"].startswith("application/json")
    allowed = {m.strip() for m in head.headers["allow"].split(",")}
    assert "GET" in allowed
    assert "HEAD" not in allowed
    assert await inspector.dbsize() == 0  # no session stored, no run requested
