"""Requests the HTTP parser refuses: a JSON answer with a fitting status, one quiet log line.

The bytes a client sent (a bearer token in an over-long header, say) never reach the log or
the answer, and no client mistake is logged at ERROR or with a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.app import create_app
from service.redis.connections import RedisOpener

from app_clients import MakeSettings
from raw_http import Address, exchange, serve_edge, split_responses
from redis_process import free_port
from stack_processes import Worker, service_env
from waiting import wait_for

SECRET = "s3cr3t-bearer-token-do-not-log"
TOKEN = "publish-token-0123456789"
OVERLONG_AUTH = (
    "GET /sse/getSessionId HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: Bearer {SECRET}{'A' * 9000}\r\n\r\n"
).encode()

MALFORMED = [
    pytest.param(OVERLONG_AUTH, 431, "headers_too_large", id="over-long header"),
    pytest.param(
        b"GET /sse/getSessionId HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, SECRET.encode()) for i in range(200))
        + b"\r\n",
        431,
        "headers_too_large",
        id="too many headers",
    ),
    pytest.param(
        b"GET /" + SECRET.encode() * 400 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        431,
        "headers_too_large",
        id="over-long request line",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Token: " + SECRET.encode() + b"\x00\r\n\r\n",
        400,
        "malformed_request",
        id="NUL in a header value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n" + SECRET.encode() + b"\r\n\r\n",
        400,
        "malformed_request",
        id="header line without a colon",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
        "malformed_request",
        id="two Content-Lengths",
    ),
    pytest.param(
        b"POST /sse/sessions/s/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + SECRET.encode()
        + b"\r\n",
        400,
        "malformed_request",
        id="bad chunk size",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nG\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "malformed_request",
        id="garbage request line after a good request",
    ),
]


@pytest.fixture
async def edge(make_settings: MakeSettings, fake_opener: RedisOpener) -> AsyncIterator[Address]:
    """The app on the runner `python -m service` uses, on the in-memory Redis."""
    app = create_app(make_settings(publish_tokens=[TOKEN]), fake_opener)
    async with serve_edge(app) as address:
        yield address


def assert_logged_quietly(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """No record at ERROR, none with a traceback, none holding the secret; the refusal lines."""
    for record in caplog.records:
        assert record.levelno < logging.ERROR, record.getMessage()
        assert record.exc_info is None, record.getMessage()
        assert SECRET not in record.getMessage()
    return [r for r in caplog.records if "refused a malformed request" in r.getMessage()]


@pytest.mark.parametrize(("raw", "status", "code"), MALFORMED)
async def test_malformed_requests_get_a_json_answer_and_one_quiet_log_line(
    edge: Address, caplog: pytest.LogCaptureFixture, raw: bytes, status: int, code: str
) -> None:
    caplog.set_level(logging.DEBUG)
    received = await exchange(edge, raw)
    *answered, refused = split_responses(received)
    assert [r.status for r in answered] == [200] * len(answered)
    assert refused.status == status
    assert refused.headers["content-type"].startswith("application/json")
    assert refused.json()["error"] == code
    assert set(refused.json()) == {"error", "detail"}
    assert SECRET.encode() not in received
    lines = assert_logged_quietly(caplog)
    assert len(lines) == 1
    # DEBUG for a bad method on a connection's first request: aiohttp's rule for port scans.
    assert lines[0].levelno in (logging.DEBUG, logging.INFO)
    assert f"{status} {code}" in lines[0].getMessage()


UNDECODABLE = {
    "deflate": SECRET.encode(),
    "gzip": SECRET.encode(),
    # A valid start that ends too early: aiohttp's own decoder left the reader waiting.
    "truncated deflate": zlib.compress(b'{"data": "x"}' * 50)[:-6],
    "truncated gzip": gzip.compress(b'{"data": "x"}' * 50)[:-6],
}


@pytest.mark.parametrize("name", list(UNDECODABLE))
@pytest.mark.parametrize("body_after_continue", [False, True], ids=["one-write", "after-100"])
async def test_an_undecodable_body_is_a_prompt_json_400_and_never_an_error_in_the_log(
    edge: Address, caplog: pytest.LogCaptureFixture, name: str, body_after_continue: bool
) -> None:
    # After `100 Continue` the handler is already reading the body when it arrives.
    caplog.set_level(logging.DEBUG)
    body = UNDECODABLE[name]
    head = (
        f"POST /sse/sessions/s/events HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: {name.rsplit(maxsplit=1)[-1]}\r\nContent-Length: {len(body)}\r\n"
    ).encode()
    if body_after_continue:
        received = await exchange(
            edge, head + b"Expect: 100-continue\r\n\r\n", after_continue=body, responses=2
        )
        continued, response = split_responses(received)
        assert continued.status == 100
    else:
        (response,) = split_responses(await exchange(edge, head + b"\r\n" + body, responses=1))
    assert response.status == 400
    assert response.json() == {
        "error": "malformed_body",
        "detail": "the body cannot be decoded with the Content-Encoding it declares",
    }
    assert_logged_quietly(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_encoding_the_worker_does_not_decode_is_a_json_415(edge: Address) -> None:
    raw = (
        f"POST /sse/sessions/s/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
        "\r\nContent-Type: application/json\r\nContent-Encoding: br\r\n"
        "Content-Length: 7\r\n\r\ngarbage"
    ).encode()
    (response,) = split_responses(await exchange(edge, raw, responses=1))
    assert response.status == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert response.headers["accept-encoding"] == "gzip, deflate"


async def test_the_app_on_any_aiohttp_server_logs_protocol_errors_quietly(
    aiohttp_client: Any,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiohttp's own runner (as in tests and `aiohttp.web` embedding) answers in its text, but
    # the app's connection logger still keeps the secret and the traceback out of the log.
    caplog.set_level(logging.DEBUG)
    client = await aiohttp_client(create_app(make_settings(), fake_opener))
    address = Address(str(client.host), int(client.port))
    received = await exchange(address, OVERLONG_AUTH)
    assert received.startswith(b"HTTP/1.0 400 ")
    lines = assert_logged_quietly(caplog)
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_the_worker_process_logs_one_line_and_answers_431_in_json(
    tmp_path: Path,
) -> None:
    worker = Worker(
        "worker",
        [sys.executable, "-m", "service", "serve"],
        service_env(port=free_port(), log_level="DEBUG"),
        tmp_path / "worker.log",
    )
    worker.port = int(worker.env["SSE_PORT"])
    worker.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(f"{worker.url}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(up, timeout_s=15, interval_s=0.05)
        (response,) = split_responses(
            await exchange(Address("127.0.0.1", worker.port), OVERLONG_AUTH)
        )
        assert response.status == 431
        assert response.json()["error"] == "headers_too_large"

        async def logged() -> bool:
            await asyncio.sleep(0)
            return "refused a malformed request" in worker.log_text()

        await wait_for(logged, timeout_s=5)
    finally:
        worker.stop()
    text = worker.log_text()
    assert SECRET not in text
    assert "Traceback" not in text
    assert " ERROR " not in text
    refusals = [line for line in text.splitlines() if "refused a malformed request" in line]
    assert len(refusals) == 1
    assert " INFO service.protocol: " in refusals[0]
    assert "431 headers_too_large" in refusals[0]
