"""Spread reconnects: each stream's `retry:` and each 429/503 `Retry-After` is its own delay."""

from __future__ import annotations

import asyncio
import random
import statistics
from typing import Any

import pytest

from service import resources as r
from service.jitter import retry_after_s, retry_delay_ms
from service.redis.connections import RedisOpener
from service.settings import SettingsError, load_settings

from app_clients import MakeSettings, StartClient
from sse_reader import STREAM_OPENED, SSEParser

DRAWS = 20_000


def test_retry_delays_fill_the_whole_range_evenly() -> None:
    rng = random.Random(7)
    delays = [retry_delay_ms(2000, 0.5, rng) for _ in range(DRAWS)]
    assert min(delays) >= 1000
    assert max(delays) <= 3000
    # Real spread, not a few values near the middle: both ends are reached...
    assert min(delays) < 1020
    assert max(delays) > 2980
    # ...and every tenth of the range holds about a tenth of the draws (uniform).
    tenths = [0] * 10
    for delay in delays:
        tenths[min(9, (delay - 1000) // 200)] += 1
    assert all(0.08 * DRAWS < count < 0.12 * DRAWS for count in tenths), tenths
    assert statistics.mean(delays) == pytest.approx(2000, rel=0.01)


@pytest.mark.parametrize(("retry_ms", "spread"), [(2000, 0.0), (0, 0.5), (1, 0.0)])
def test_no_spread_or_no_delay_gives_the_fixed_value(retry_ms: int, spread: float) -> None:
    assert {retry_delay_ms(retry_ms, spread) for _ in range(1000)} == {retry_ms}


def test_a_full_spread_stays_within_zero_and_twice_the_delay() -> None:
    rng = random.Random(3)
    delays = [retry_delay_ms(1000, 1.0, rng) for _ in range(DRAWS)]
    assert 0 <= min(delays) < 20
    assert 1980 < max(delays) <= 2000


def test_retry_after_is_a_whole_number_of_seconds_never_below_the_declared_wait() -> None:
    rng = random.Random(11)
    ones = [retry_after_s(1, 0.5, rng) for _ in range(1000)]
    assert set(ones) == {1, 2}
    assert 400 < ones.count(2) < 600
    tens = [retry_after_s(10, 0.5, rng) for _ in range(5000)]
    assert set(tens) == set(range(10, 16))
    # RFC 9110's delay-seconds is a non-negative integer; a zero would mean "at once".
    assert {retry_after_s(0, 0.5, rng) for _ in range(200)} == {1, 2}
    assert {retry_after_s(-5, 0.5, rng) for _ in range(200)} == {1, 2}


@pytest.mark.parametrize("declared", [0, 1, 4, 3600])
def test_retry_after_without_spread_is_the_declared_wait(declared: int) -> None:
    assert {retry_after_s(declared, 0.0) for _ in range(200)} == {max(1, declared)}


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_a_spread_outside_zero_to_one_is_refused_by_name(value: str) -> None:
    with pytest.raises(SettingsError, match="'retry_spread'"):
        load_settings(None, {"SSE_RETRY_SPREAD": value})


async def first_retry_ms(client: Any, session_id: str) -> int:
    async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
        assert response.status == 200
        async with asyncio.timeout(5):
            head = await response.content.readuntil(STREAM_OPENED)
    parser = SSEParser()
    parser.feed(head.decode())
    assert parser.retry_ms is not None
    return parser.retry_ms


async def test_streams_of_one_worker_announce_retries_spread_over_the_range(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    settings = make_settings(retry_ms=2000, retry_spread=0.5, demo_runs=False)
    client = await start_client(settings, fake_opener)
    delays = [await first_retry_ms(client, f"spread-{n}") for n in range(200)]
    assert all(1000 <= delay <= 3000 for delay in delays)
    # Two hundred streams told the same delay would come back in one burst.
    assert len(set(delays)) > 150
    assert min(delays) < 1300
    assert max(delays) > 2700
    assert statistics.pstdev(delays) > 400  # uniform over 2000 ms: about 577


async def test_with_no_spread_every_stream_announces_retry_ms(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    settings = make_settings(retry_ms=2000, retry_spread=0.0, demo_runs=False)
    client = await start_client(settings, fake_opener)
    assert {await first_retry_ms(client, f"fixed-{n}") for n in range(30)} == {2000}


@pytest.mark.parametrize(("spread", "expected"), [(0.5, {"1", "2"}), (0.0, {"1"})])
async def test_503s_of_a_draining_worker_carry_spread_retry_afters(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    spread: float,
    expected: set[str],
) -> None:
    client = await start_client(make_settings(retry_spread=spread), fake_opener)
    await r.drain_streams(client.app)
    seen = set()
    for n in range(60):
        response = await client.get("/sse/connect", params={"sessionId": f"late-{n}"})
        assert response.status == 503
        assert (await response.json())["error"] == "unavailable"
        seen.add(response.headers["Retry-After"])
    assert seen == expected


async def test_429s_keep_at_least_the_wait_their_limit_needs(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    # One session id every 10 s after a burst of one: the limit's own wait is 10 s.
    settings = make_settings(session_rate_per_s=0.1, session_burst=1, retry_spread=0.5)
    client = await start_client(settings, fake_opener)
    assert (await client.get("/sse/getSessionId")).status == 200
    waits = []
    for _ in range(60):
        refused = await client.get("/sse/getSessionId")
        assert refused.status == 429
        waits.append(int(refused.headers["Retry-After"]))
    assert all(9 <= wait <= 15 for wait in waits), waits
    assert len(set(waits)) >= 3
