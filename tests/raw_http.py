"""Raw HTTP/1.1 over a socket, for tests of what no well-behaved client sends.

`serve_edge` runs an app on the same runner as `python -m service` (protocol.EdgeAppRunner) on
a free loopback port; `exchange` sends bytes and reads the answers; `split_responses` cuts
what came back into responses, so a test can tell whether the bytes after one response are
exactly the next response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from service.protocol import EdgeAppRunner

READ_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Address:
    host: str
    port: int


@asynccontextmanager
async def serve_edge(app: web.Application) -> AsyncIterator[Address]:
    """`app` on a loopback port, on the runner the worker's entry point uses."""
    runner = EdgeAppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield Address(host, port)
    finally:
        await runner.cleanup()


async def exchange(
    address: Address,
    data: bytes,
    *,
    responses: int | None = None,
    head_only: frozenset[int] = frozenset(),
    after_continue: bytes = b"",
) -> bytes:
    """Send `data`; read until the server closes or `responses` whole responses arrived.

    With `after_continue`, `data` is a request head with `Expect: 100-continue`: the body is
    sent once the server answered `100 Continue`, that is once the app has the request.
    Raises TimeoutError if neither happens within READ_TIMEOUT_S.
    """
    reader, writer = await asyncio.open_connection(address.host, address.port)
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(READ_TIMEOUT_S):
            if after_continue:
                received = await reader.readuntil(b"\r\n\r\n")
                if not received.startswith(b"HTTP/1.1 100 "):
                    raise ValueError(f"expected 100 Continue, got {received!r}")
                writer.write(after_continue)
                await writer.drain()
            while responses is None or _complete(received, head_only) < responses:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    return received


def _complete(data: bytes, head_only: frozenset[int]) -> int:
    try:
        return len(split_responses(data, head_only))
    except ValueError:
        return -1


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def split_responses(data: bytes, head_only: frozenset[int] = frozenset()) -> list[RawResponse]:
    """Responses with a Content-Length body, in order; those at `head_only` have no body.

    Raises ValueError when the bytes do not start with a well-formed response, so garbage
    after a response (a body where none belongs) fails the test that reads it.
    """
    responses: list[RawResponse] = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError(f"incomplete response head: {data[:200]!r}")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ")
        if not version.startswith("HTTP/1.") or not status.isdigit():
            raise ValueError(f"not a status line: {status_line!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if len(responses) in head_only else int(headers.get("content-length", "0"))
        if len(rest) < length:
            raise ValueError(f"incomplete body: {len(rest)} of {length} bytes")
        responses.append(RawResponse(int(status), headers, rest[:length]))
        data = rest[length:]
    return responses
