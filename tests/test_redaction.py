"""What logs show of a request: secrets redacted (worker and nginx), no forged lines."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.app import create_app
from service.logs import logging_config, redacted_url
from service.redaction import MAX_LOGGED_QUERY_CHARS, REDACTED, loggable, redacted_query
from service.redis.connections import RedisOpener, open_redis
from service.settings import StartupError, build_settings
from service.startup import bind_sockets, producer_line, serving_line

from app_clients import MakeSettings, StartClient
from raw_http import exchange, serve_edge
from redis_process import free_port
from signing import HS_SECRET, claims, hs256_key, sign
from stack_processes import Child, local_nginx_conf, nginx_argv, require_nginx
from waiting import wait_for


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("", ""),
        ("sessionId=a", "sessionId=a"),
        ("sessionId=a&access_token=x.y.z", f"sessionId=a&access_token={REDACTED}"),
        ("access_token=x&access_token=y", f"access_token={REDACTED}&access_token={REDACTED}"),
        ("access%5Ftoken=x", f"access%5Ftoken={REDACTED}"),
        ("ACCESS_TOKEN=x", f"ACCESS_TOKEN={REDACTED}"),
        ("a=1;access_token=x", f"a=1;access_token={REDACTED}"),
        ("access_token", f"access_token={REDACTED}"),
        ("access_token=", f"access_token={REDACTED}"),
        ("my_access_token=x&tokens=y", "my_access_token=x&tokens=y"),
        ("x=access_token%3Dy", "x=access_token%3Dy"),
    ],
)
def test_redacted_query(query: str, logged: str) -> None:
    assert redacted_query(query) == logged


def test_a_long_query_is_cut() -> None:
    logged = redacted_query("a=" + "x" * 5000)
    assert len(logged) == MAX_LOGGED_QUERY_CHARS + 1
    assert logged.endswith("…")


@pytest.mark.parametrize(
    ("sent", "logged"),
    [
        ("/sse/connect", "/sse/connect"),
        ("/a\r\n2026-01-01 INFO forged", "/a\\r\\n2026-01-01 INFO forged"),
        ("/\x1b[31mred\x00", "/\\x1b[31mred\\x00"),
        ("/a\\nb", "/a\\\\nb"),  # a literal backslash cannot pose as an escape
        ("/\u2028\u202e\x85", "/\\u2028\\u202e\\x85"),
        ("/caf\u00e9 \u7ed3\u675f", "/caf\u00e9 \u7ed3\u675f"),
    ],
)
def test_loggable_escapes_what_could_forge_or_hide_a_line(sent: str, logged: str) -> None:
    assert loggable(sent) == logged
    assert loggable(sent).isprintable()


def _unforgeable(caplog: pytest.LogCaptureFixture, make_settings: MakeSettings) -> list[str]:
    """Every captured line as the plain formatter writes it, failing on an unprintable one."""
    plain = logging_config(make_settings(log_format="plain"))["formatters"]["default"]
    formatter = logging.Formatter(plain["format"])
    lines = [formatter.format(record) for record in caplog.records]
    assert lines, "the requests should have been logged"
    assert [line for line in lines if not line.isprintable()] == []
    return lines


async def test_a_path_with_line_breaks_cannot_forge_log_lines(
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    forged = b"/nope%0D%0A2026-11-30 12:00:00,000 INFO service.api: forged%1B%5B2K%00"
    async with serve_edge(create_app(make_settings(), fake_opener)) as address:
        answer = await exchange(
            address,
            b"GET " + forged.replace(b" ", b"%20") + b" HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 404 ")
    lines = _unforgeable(caplog, make_settings)
    assert any("/nope\\r\\n2026-11-30" in line for line in lines)


async def test_a_field_name_with_line_breaks_cannot_forge_log_lines(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await start_client(make_settings(publish_tokens=("t" * 32,)), fake_opener)
    caplog.set_level(logging.INFO, logger="service")
    response = await client.post(
        "/sse/sessions/s1/events",
        json={"data": "x", "a\nINFO forged": 1},
        headers={"Authorization": f"Bearer {'t' * 32}"},
    )
    assert response.status == 400
    lines = _unforgeable(caplog, make_settings)
    assert any("a\\nINFO forged" in line for line in lines)


def _start_nginx(prefix: Path, worker_port: int, listen_port: int, log: Path) -> Child:
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(local_nginx_conf([worker_port], listen_port))
    nginx = Child(
        "nginx",
        nginx_argv(require_nginx(), prefix, directives="daemon off;"),
        dict(os.environ),
        log,
    )
    nginx.start()
    return nginx


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def test_nginx_logs_no_query(
    aiohttp_server: Any, make_settings: MakeSettings, tmp_path: Path
) -> None:
    """config/nginx.conf's access log leaves the query out, where a token may travel."""
    settings = make_settings(
        subscribe_auth="token", token_hs256_secrets=[f"hs1:{HS_SECRET}"], demo_runs=False
    )
    server = await aiohttp_server(create_app(settings), access_log=None)
    listen_port = free_port()
    log = tmp_path / "nginx.log"
    nginx = _start_nginx(tmp_path / "nginx", server.port, listen_port, log)
    token = sign(hs256_key("hs1"), claims(subscribe=["other"]))
    base = f"http://127.0.0.1:{listen_port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def through_nginx() -> bool:
                try:
                    async with session.get(f"{base}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(through_nginx, timeout_s=15, interval_s=0.05)
            url = f"{base}/sse/connect?sessionId=s1&access_token={token}"
            async with session.get(url) as response:
                assert response.status == 403  # the worker read the token: it got through

            async def logged() -> bool:
                return "/sse/connect" in _read(log)

            await wait_for(logged, timeout_s=10, interval_s=0.05)
    finally:
        nginx.stop()
    text = _read(log)
    assert '"GET /sse/connect HTTP/1.1" 403' in text
    for part in token.split("."):
        assert part not in text
    assert "access_token" not in text


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://:pw@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://app:pw@redis:6379/0", "redis://app:***@redis:6379/0"),
        ("redis://pw@redis:6379/0", "redis://***@redis:6379/0"),
        ("rediss://pw@redis:6380", "rediss://***@redis:6380"),
        ("unix://pw@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
        ("redis+sentinel://pw@h1,h2/svc", "redis+sentinel://***@h1,h2/svc"),
        ("redis://pw@redis/0?password=pw2", "redis://***@redis/0?password=***"),
    ],
)
def test_a_redis_url_is_logged_without_its_secrets(url: str, logged: str) -> None:
    assert redacted_url(url) == logged


SECRET = "only-userinfo-s3cret"


@pytest.mark.parametrize("command", ["serve", "producer"])
def test_start_up_lines_show_no_userinfo(command: str) -> None:
    settings = build_settings({"redis_url": f"redis://{SECRET}@redis:6379/0"})
    loop = asyncio.new_event_loop()
    sockets = bind_sockets("127.0.0.1", 0, 8)
    try:
        line = (
            serving_line(settings, sockets, loop)
            if command == "serve"
            else producer_line(settings, loop)
        )
    finally:
        loop.close()
        for sock in sockets:
            sock.close()
    assert "redis: redis://***@redis:6379/0" in line
    assert SECRET not in line


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_connecting_to_redis_logs_no_userinfo(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    unreachable = make_settings(redis_url=f"redis://{SECRET}@127.0.0.1:{free_port()}/0")
    with pytest.raises(StartupError) as failed:
        await open_redis(unreachable)
    assert "redis at redis://***@127.0.0.1:" in str(failed.value)
    assert SECRET not in str(failed.value)
    assert any("redis://***@127.0.0.1" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if SECRET in r.getMessage()]
