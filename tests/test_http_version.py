"""A request line naming HTTP/2.0 or 0.9 is refused in HTTP/1.1, never answered in its version."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from service.http_version import http_version_middleware
from service.redis.connections import RedisOpener

from app_clients import AppClient, MakeSettings, StartClient


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    return await start_client(make_settings(), fake_opener)


async def exchange(
    client: AppClient, request: bytes, *, read_body: bool = True
) -> tuple[bytes, bytes]:
    """The response head and body on a new connection, checking nothing follows them."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length) if read_body else b""
            rest = await reader.read()  # the server closes the connection
    finally:
        writer.close()
    assert rest == b"", rest[:80]  # a HEAD answer has no body either
    return head, body


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])
@pytest.mark.parametrize("path", ["/healthz", "/sse/connect?sessionId=abc", "/nope"])
async def test_other_http_versions_get_400_in_http11(
    client: AppClient, version: str, path: str
) -> None:
    head, body = await exchange(client, f"GET {path} {version}\r\nHost: x\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head
    assert b"\r\nConnection: close\r\n" in head
    assert json.loads(body) == {
        "error": "unsupported_http_version",
        "detail": f"{version} is not supported; use HTTP/1.1",
    }


async def test_head_in_another_version_gets_no_body(client: AppClient) -> None:
    head, _ = await exchange(client, b"HEAD /healthz HTTP/2.0\r\nHost: x\r\n\r\n", read_body=False)
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
async def test_http10_and_11_are_served_in_their_own_version(
    client: AppClient, version: str
) -> None:
    request = f"GET /healthz {version}\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    head, body = await exchange(client, request)
    assert head.startswith(f"{version} 200 OK\r\n".encode()), head
    assert json.loads(body) == {"status": "ok"}


async def test_a_supported_request_reaches_the_handler_with_no_frame_in_between() -> None:
    # A coroutine of the middleware's own would stay suspended under every open stream.
    answer = web.Response()

    async def handler(request: web.Request) -> web.StreamResponse:
        return answer

    request = make_mocked_request("GET", "/sse/connect")
    pending = handler(request)
    passed_on = http_version_middleware(request, lambda _: pending)
    assert passed_on is pending
    assert await passed_on is answer
