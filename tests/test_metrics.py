"""Health, readiness, Prometheus metrics and the access log of one worker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import access_log
from service.logs import JsonFormatter
from service.redis.connections import RedisOpener
from service.resources import producer_key

from app_clients import AppClient, MakeSettings, StartClient
from redis_process import RedisProcess, require_redis_server
from sse_reader import STREAM_OPENED, collect
from waiting import wait_for


async def scrape(client: AppClient) -> dict[str, float]:
    """Every sample of GET /metrics, keyed by name plus labels as Prometheus prints them."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    return await start_client(make_settings(), fake_opener)


async def test_metrics_count_a_finished_stream_and_a_resume(client: AppClient) -> None:
    before = await scrape(client)
    assert before["sse_open_streams"] == 0
    assert before["sse_events_delivered_total"] == 0

    session_id = await (await client.get("/sse/getSessionId")).text()
    async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
        events = await collect(response)
    assert len(events) == 10
    first = await scrape(client)
    assert first["sse_events_delivered_total"] == 10
    assert first["sse_events_published_total"] == 10
    assert first['sse_streams_ended_total{reason="finished"}'] == 1
    assert first['sse_streams_ended_total{reason="client_gone"}'] == 0
    assert first["sse_open_streams"] == 0
    assert first["sse_slow_clients_dropped_total"] == 0
    assert first["sse_redis_reconnects_total"] == 0
    assert first["sse_hub_connected"] == 1

    # Resuming after event 4 replays the six events after it from the log.
    headers = {"Last-Event-ID": events[3].id}
    async with client.get(
        "/sse/connect", params={"sessionId": session_id}, headers=headers
    ) as response:
        assert len(await collect(response)) == 6
    second = await scrape(client)
    assert second["sse_events_delivered_total"] == 16
    assert second["sse_events_replayed_total"] == first["sse_events_replayed_total"] + 6
    assert second['sse_streams_ended_total{reason="finished"}'] == 2


async def test_open_stream_is_counted_until_its_client_leaves(client: AppClient) -> None:
    channels_before = (await scrape(client))["sse_hub_channels"]
    async with client.get("/sse/connect", params={"sessionId": "open-one"}) as response:
        await response.content.readuntil(STREAM_OPENED)
        during = await scrape(client)
        assert during["sse_open_streams"] == 1
        assert during["sse_hub_channels"] == channels_before + 1

    async def closed() -> bool:
        return (await scrape(client))["sse_open_streams"] == 0

    await wait_for(closed)
    assert (await scrape(client))['sse_streams_ended_total{reason="client_gone"}'] == 1


async def test_two_apps_in_one_process_keep_their_own_metrics(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    busy = await start_client(make_settings(), fake_opener)
    # Without a producer of its own, since either app's producer may execute a run.
    idle = await start_client(make_settings(producer="off"), fake_opener)
    async with busy.get("/sse/connect", params={"sessionId": "busy"}) as response:
        assert len(await collect(response)) == 10
    assert (await scrape(busy))["sse_events_delivered_total"] == 10
    assert (await scrape(idle))["sse_events_delivered_total"] == 0
    assert (await scrape(idle))["sse_events_published_total"] == 0


async def test_healthz_answers_without_touching_redis(client: AppClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.redis
async def test_readyz_is_200_with_redis_and_503_once_it_is_gone(
    start_client: StartClient,
    make_settings: MakeSettings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisProcess(require_redis_server(), tmp_path / "redis")
    server.start()
    try:
        client = await start_client(make_settings(redis_url=server.url, redis_timeout_s=0.5))
        ready = await client.get("/readyz")
        assert ready.status == 200
        assert (await ready.json())["status"] == "ready"
        server.stop()
        with caplog.at_level(logging.WARNING, logger="service"):
            gone = await client.get("/readyz")
        assert gone.status == 503
        body = await gone.json()
        assert body["status"] == "unavailable"
        assert "redis: unreachable" in body["problems"]
        # Where Redis is and what the driver said go to the log, not to whoever asks.
        text = await gone.text()
        assert str(server.port) not in text
        assert "127.0.0.1" not in text
        assert any(
            "readiness" in r.getMessage() and str(server.port) in r.getMessage()
            for r in caplog.records
        ), caplog.text
    finally:
        server.stop()


async def test_readyz_names_a_failing_producer_scan_without_its_internals(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await start_client(make_settings(producer_poll_ms=10), fake_opener)
    producer = client.app[producer_key]

    async def broken() -> bool:
        raise RuntimeError("internal state at 0x7f00dead")

    monkeypatch.setattr(producer, "_claim_due_runs", broken)
    with caplog.at_level(logging.ERROR, logger="service"):
        await wait_for(lambda: _not_ready(client), timeout_s=5, interval_s=0.02)
    response = await client.get("/readyz")
    assert response.status == 503
    assert "0x7f00dead" not in await response.text()
    assert any("producer" in problem for problem in (await response.json())["problems"])
    assert "0x7f00dead" in caplog.text


async def _not_ready(client: AppClient) -> bool:
    return int((await client.get("/readyz")).status) == 503


async def test_every_request_gets_one_access_log_line(
    client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.access_log"):
        response = await client.get("/sse/getSessionId", headers={"X-Request-Id": "req-42"})
        assert response.status == 200
        missing = await client.get("/no/such/page")
        assert missing.status == 404
    lines = [r for r in caplog.records if r.name == "service.access_log"]
    assert [r.getMessage().split()[:3] for r in lines] == [
        ["GET", "/sse/getSessionId", "200"],
        ["GET", "/no/such/page", "404"],
    ]
    assert lines[0].fields["request_id"] == "req-42"  # type: ignore[attr-defined]
    # The error middleware's id for the 404 is the one the client was given.
    assert lines[1].fields["request_id"] == missing.headers["X-Request-Id"]  # type: ignore[attr-defined]

    entry = json.loads(JsonFormatter().format(lines[0]))
    assert entry["message"].startswith("GET /sse/getSessionId 200 ")
    assert {entry["method"], entry["path"], entry["status"]} == {"GET", "/sse/getSessionId", 200}
    assert entry["duration_s"] >= 0


async def test_an_access_log_line_below_the_level_is_not_built(
    client: AppClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unexpected(raw_query: str) -> str:
        raise AssertionError(f"built a line nobody writes: {raw_query}")

    monkeypatch.setattr(access_log, "redacted_query", unexpected)
    with caplog.at_level(logging.WARNING, logger="service.access_log"):
        response = await client.get("/sse/getSessionId", params={"for": "nobody"})
    assert response.status == 200
    assert not [r for r in caplog.records if r.name == "service.access_log"]


async def test_stream_end_is_logged_with_its_reason_and_counts(
    client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.connect"):
        async with client.get("/sse/connect", params={"sessionId": "logged"}) as response:
            assert len(await collect(response)) == 10
    [line] = [r for r in caplog.records if r.getMessage().startswith("stream end ")]
    fields = line.fields  # type: ignore[attr-defined]
    assert fields["session"] == "logged"
    assert fields["reason"] == "finished"
    assert fields["events"] == 10
    assert "reason=finished events=10 " in line.getMessage()
