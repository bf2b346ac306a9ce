"""Stream requests a worker cannot serve right now: EventSource is told to come back.

EventSource gives up for good on any status but 200, so a passing condition (Redis down or
silent, the worker full or draining) is answered, to a client that asks for an event stream,
with a 200 stream holding only a `retry:` delay (jittered around `retry_ms`) and then closed:
it reconnects, resuming from its last id. Other clients keep the 503 JSON with Retry-After.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service import resources as r

from app_clients import AppClient, MakeSettings, StartClient
from chromium_process import headless_chromium
from live_service import serve
from redis_process import RedisProcess, require_redis_server
from sse_reader import SSEParser
from waiting import wait_for

RETRY_MS = 400
EVENT_STREAM = {"Accept": "text/event-stream"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server this test may stop, freeze and start again."""
    server = RedisProcess(require_redis_server(), tmp_path / "redis")
    server.start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


async def assert_told_to_come_back(response: Any) -> int:
    """A 200 event stream of only a `retry:` delay, already complete; the delay."""
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    async with asyncio.timeout(5):
        body = (await response.read()).decode()
    parser = SSEParser()
    assert parser.feed(body) == []  # no event: nothing for the application to see
    assert parser.retry_ms is not None
    assert RETRY_MS * 0.5 <= parser.retry_ms <= RETRY_MS * 1.5
    return parser.retry_ms


async def connect(client: AppClient, session_id: str, headers: dict[str, str] | None = None) -> Any:
    return await client.get("/sse/connect", params={"sessionId": session_id}, headers=headers)


@pytest.mark.redis
async def test_an_event_stream_request_while_redis_is_down_is_told_to_come_back(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
) -> None:
    settings = make_settings(redis_url=own_redis.url, retry_ms=RETRY_MS, redis_timeout_s=0.5)
    client = await start_client(settings)
    own_redis.kill()
    await assert_told_to_come_back(await connect(client, "away", EVENT_STREAM))
    # A client that did not ask for an event stream gets the error as it is.
    plain = await connect(client, "away")
    assert plain.status == 503
    assert plain.headers["Retry-After"]
    assert client.app[r.stream_metrics_key].deferred_count == 1


@pytest.mark.redis
async def test_a_connect_to_an_unresponsive_redis_fails_within_the_redis_timeout(
    start_client: StartClient,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
) -> None:
    settings = make_settings(redis_url=own_redis.url, retry_ms=RETRY_MS, redis_timeout_s=0.5)
    client = await start_client(settings)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # up, but answering nothing
    started = time.monotonic()
    response = await connect(client, "frozen", EVENT_STREAM)
    elapsed_s = time.monotonic() - started
    await assert_told_to_come_back(response)
    # Bounded by redis_timeout_s, not by the 5 s a subscription may take to be confirmed.
    assert elapsed_s < 2.0, f"the connect took {elapsed_s:.2f}s"


async def test_a_draining_worker_tells_event_stream_clients_to_come_back_with_jitter(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: Any,
) -> None:
    client = await start_client(make_settings(retry_ms=RETRY_MS, retry_spread=0.5), fake_opener)
    await r.drain_streams(client.app)
    delays = [
        await assert_told_to_come_back(await connect(client, f"late{n}", EVENT_STREAM))
        for n in range(20)
    ]
    assert len(set(delays)) > 1  # not all back at the same moment


async def test_a_full_worker_tells_event_stream_clients_to_come_back(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: Any,
) -> None:
    settings = make_settings(retry_ms=RETRY_MS, demo_runs=False, max_connections=1)
    client = await start_client(settings, fake_opener)
    async with client.get("/sse/connect", params={"sessionId": "first"}) as first:
        assert first.status == 200
        await assert_told_to_come_back(await connect(client, "second", EVENT_STREAM))
        plain = await connect(client, "third")
        assert plain.status == 503


CHROMIUM_SOURCE = """url => {
    window.records = [];
    const source = new EventSource(url);
    window.source = source;
    for (const name of ["message", "finish"]) {
        source.addEventListener(name, event => window.records.push(
            {kind: "event", type: event.type, id: event.lastEventId}));
    }
    source.onerror = () => window.records.push({kind: "error", state: source.readyState});
}"""


@pytest.mark.redis
@pytest.mark.browser
async def test_chromium_keeps_reconnecting_through_a_redis_outage_and_gets_its_run(
    aiohttp_server: Any,
    make_settings: MakeSettings,
    own_redis: RedisProcess,
) -> None:
    settings = make_settings(
        redis_url=own_redis.url, retry_ms=RETRY_MS, redis_timeout_s=0.5, producer_interval_ms=30
    )
    service = await serve(aiohttp_server, settings)
    base = service.url.rstrip("/")
    own_redis.kill()
    async with headless_chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{base}/healthz")  # the service's own origin
        await page.evaluate(CHROMIUM_SOURCE, f"{base}/sse/connect?sessionId=outage")

        async def turned_away_twice() -> bool:
            return len([s for s in service.connects() if s.session_id == "outage"]) >= 2

        await wait_for(turned_away_twice, timeout_s=10, interval_s=0.05)
        own_redis.start()

        async def finished() -> bool:
            records = await page.evaluate("window.records")
            return any(record.get("type") == "finish" for record in records)

        await wait_for(finished, timeout_s=20, interval_s=0.05)
        records = await page.evaluate("window.records")
        # It never gave up before its run ended (2 is CLOSED; after `finish`, the reconnect
        # it makes is answered 204, which closes it on purpose), and got the whole run once.
        finish_at = next(n for n, record in enumerate(records) if record.get("type") == "finish")
        assert all(
            record["state"] != 2 for record in records[:finish_at] if record["kind"] == "error"
        )
        events = [record for record in records if record["kind"] == "event"]
        assert [e["type"] for e in events] == ["message"] * 9 + ["finish"]
        assert len({e["id"] for e in events}) == 10
