"""The publish API refuses a bad body with a 4xx in the JSON shape and publishes none of it."""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.keys import Keys
from service.redis.connections import RedisOpener

from app_clients import AppClient, MakeSettings, StartClient

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    return await start_client(make_settings(publish_tokens=[TOKEN], demo_runs=False), fake_opener)


@pytest.fixture
async def inspector(fake_opener: RedisOpener, make_settings: MakeSettings) -> AsyncIterator[Any]:
    """A client on the app's in-memory Redis, to see what was logged."""
    redis = await fake_opener(make_settings())
    yield redis
    await redis.aclose()


async def logged_count(inspector: Any, session_id: str) -> int:
    return int(await inspector.xlen(Keys().log(session_id)))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(b'{"event": "x\\n", "data": "y"}', "invalid_event", id="name ending in LF"),
        pytest.param(
            b'[{"data": "first"}, {"data": "second"}, {"event": "x\\n", "data": "y"}]',
            "invalid_event",
            id="batch whose last name ends in LF",
        ),
        pytest.param(b'{"event": "x\\r", "data": "y"}', "invalid_event", id="name ending in CR"),
        pytest.param(b'{"data": 1e999}', "malformed_json", id="number out of range"),
        pytest.param(
            b'[{"data": "first"}, {"data": {"deep": [1, -1e999]}}]',
            "malformed_json",
            id="batch with a nested out-of-range number",
        ),
    ],
)
async def test_a_bad_body_is_a_400_and_nothing_is_published(
    client: AppClient,
    inspector: Any,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    code: str,
) -> None:
    caplog.set_level(logging.INFO)
    response = await client.post(
        "/sse/sessions/bad-body/events",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"] == code
    assert await logged_count(inspector, "bad-body") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_a_compressed_body_is_decoded_and_published(
    client: AppClient,
    inspector: Any,
    encoding: str,
    compress: Any,
) -> None:
    response = await client.post(
        "/sse/sessions/packed/events",
        data=compress(b'[{"data": "a"}, {"data": "b"}]'),
        headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert response.status == 202, await response.text()
    assert len((await response.json())["ids"]) == 2
    assert await logged_count(inspector, "packed") == 2
