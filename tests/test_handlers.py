"""HTTP behaviour through the production app on the in-memory Redis: headers, errors, the demo."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from service.envelope import parse_event_id
from service.keys import Keys
from service.redis.connections import RedisOpener
from service.resources import hub_key
from service.sessions import Attachment, SessionStore

from app_clients import AppClient, MakeSettings, StartClient
from sse_reader import STREAM_OPENED, SSEParser, collect
from waiting import wait_for


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    return await start_client(make_settings(), fake_opener)


async def test_get_session_id_returns_plain_base62(client: AppClient) -> None:
    response = await client.get("/sse/getSessionId")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert text.isalnum()
    assert text.isascii()
    assert len(text) == 22
    assert await (await client.get("/sse/getSessionId")).text() != text


async def test_stream_headers_and_first_bytes_arrive_at_once(client: AppClient) -> None:
    async with client.get("/sse/connect", params={"sessionId": "1234"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Accel-Buffering"] == "no"
        async with asyncio.timeout(2):
            first = await response.content.readuntil(STREAM_OPENED)
        assert first == b"retry: 500\n: connected\n"


async def test_full_demo_sequence(client: AppClient) -> None:
    session_id = await (await client.get("/sse/getSessionId")).text()
    parser = SSEParser()
    async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
        events = await collect(response, parser=parser)
    assert len(events) == 10
    assert [e.event for e in events] == ["message"] * 9 + ["finish"]
    for event in events[:9]:
        assert event.data.startswith("server time: ")
        assert event.data.endswith(f" id: {session_id}")
    assert events[9].data.endswith(f" 结束: {session_id}")
    positions = [parse_event_id(e.id) for e in events]
    assert positions == sorted(set(positions))
    assert parser.retry_ms == 500
    assert "connected" in parser.comments


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"sessionId": ""},
        {"sessionId": "a b"},
        {"sessionId": "x" * 65},
        {"sessionId": "a\r\nevent: finish"},
        {"sessionId": "é"},
    ],
)
async def test_bad_session_id_is_a_400_json_error(
    client: AppClient, params: dict[str, str]
) -> None:
    response = await client.get("/sse/connect", params=params)
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_parameter"
    assert "sessionId" in body["detail"]


async def test_repeated_session_id_parameter_is_refused(client: AppClient) -> None:
    response = await client.get("/sse/connect?sessionId=a&sessionId=b")
    assert response.status == 400


@pytest.mark.parametrize("bad", ["abc", "1-", "-1", "1-2-3", "1.5-0", "1-0\r\nx"])
async def test_malformed_last_event_id_is_a_400(client: AppClient, bad: str) -> None:
    response = await client.get("/sse/connect", params={"sessionId": "s", "lastEventId": bad})
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_parameter"


async def test_unknown_session_is_404_when_issuing_is_required(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    client = await start_client(make_settings(require_issued_session=True), fake_opener)
    response = await client.get("/sse/connect", params={"sessionId": "1234"})
    assert response.status == 404
    assert (await response.json())["error"] == "session_not_found"
    issued = await (await client.get("/sse/getSessionId")).text()
    async with client.get("/sse/connect", params={"sessionId": issued}) as stream:
        assert stream.status == 200
        assert len(await collect(stream)) == 10


async def test_stream_closes_when_the_session_ttl_runs_out(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    settings = make_settings(session_ttl_s=0.5, demo_runs=False)
    client = await start_client(settings, fake_opener)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get("/sse/connect", params={"sessionId": "short"}) as response:
        assert await collect(response, timeout_s=5) == []
    assert 0.4 < loop.time() - started < 3


async def test_idle_stream_gets_heartbeat_comments(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    settings = make_settings(heartbeat_interval_s=0.05, demo_runs=False, session_ttl_s=0.4)
    client = await start_client(settings, fake_opener)
    parser = SSEParser()
    async with client.get("/sse/connect", params={"sessionId": "idle"}) as response:
        await collect(response, parser=parser, timeout_s=5)
    assert parser.comments.count("ping") >= 3


async def test_cors_is_open_by_default(client: AppClient) -> None:
    response = await client.get(
        "/sse/getSessionId", headers={"Origin": "https://elsewhere.example"}
    )
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://elsewhere.example")
    preflight = await client.options(
        "/sse/connect",
        headers={
            "Origin": "https://elsewhere.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert preflight.status == 200
    assert "last-event-id" in preflight.headers["Access-Control-Allow-Headers"].lower()


async def test_cors_origins_are_configurable(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    client = await start_client(make_settings(cors_origins=("https://ok.example",)), fake_opener)
    allowed = await client.get("/sse/getSessionId", headers={"Origin": "https://ok.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    denied = await client.get("/sse/getSessionId", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in denied.headers


async def test_unknown_route_is_a_json_404(client: AppClient) -> None:
    response = await client.get("/no/such/thing")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


async def test_streams_carry_the_request_id_the_logs_use(
    client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    headers = {"X-Request-Id": "trace-me-42"}
    async with client.get("/sse/connect", params={"sessionId": "traced"}, headers=headers) as r:
        assert r.headers["X-Request-Id"] == "trace-me-42"
        await collect(r)
    async with client.get("/sse/connect", params={"sessionId": "untraced"}) as response:
        generated = response.headers["X-Request-Id"]
        await collect(response)
    assert len(generated) == 32

    async def logged() -> bool:
        return any(f"request={generated}" in m for m in caplog.messages)

    await wait_for(logged)
    assert any("request=trace-me-42" in message for message in caplog.messages)


async def test_a_malformed_query_resume_point_is_refused_even_beside_a_good_header(
    client: AppClient,
) -> None:
    response = await client.get(
        "/sse/connect",
        params={"sessionId": "s", "lastEventId": "12345678901234567890-1"},
        headers={"Last-Event-ID": "1-0"},
    )
    assert response.status == 400
    assert "lastEventId" in (await response.json())["detail"]


async def test_an_oversized_request_id_is_cut_to_64_characters(client: AppClient) -> None:
    response = await client.get("/sse/getSessionId", headers={"X-Request-Id": "r" * 500})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "r" * 64


async def test_a_hub_failed_beyond_repair_fails_liveness_not_just_readiness(
    client: AppClient,
) -> None:
    # Readiness only takes a worker out of the load balancer; a hub that stopped on a bug
    # never comes back, so liveness must ask for the restart that would bring it back.
    assert (await client.get("/healthz")).status == 200
    async with client.get("/sse/connect", params={"sessionId": "doomed"}) as response:
        await response.content.readuntil(STREAM_OPENED)
        client.app[hub_key].on_failed()  # what a bug in a pub/sub reader leads to
        async with asyncio.timeout(5):
            await response.content.read()  # the stream ends, it does not hang
    health = await client.get("/healthz")
    assert health.status == 503
    assert await health.json() == {
        "status": "failed",
        "problems": ["shared subscription failed; restart the worker"],
    }
    assert (await client.get("/readyz")).status == 503
    refused = await client.get("/sse/connect", params={"sessionId": "later"})
    assert refused.status == 503
    assert refused.content_type == "application/json"


async def test_an_attach_answered_after_the_redis_deadline_is_answered_503(
    start_client: StartClient, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On Python 3.11 a cancellation can be swallowed under asyncio.wait_for (CPython
    # gh-86296), so an attach may return after its deadline fired: still a timeout.
    original = SessionStore.attach

    async def late(self: SessionStore, *args: Any, **kwargs: Any) -> Attachment:
        attachment = await original(self, *args, **kwargs)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)  # past the deadline, whose cancellation is swallowed
        return attachment

    monkeypatch.setattr(SessionStore, "attach", late)
    client = await start_client(make_settings(redis_timeout_s=0.2))
    response = await client.get("/sse/connect", params={"sessionId": "late"})
    assert response.status == 503
    assert "Retry-After" in response.headers

    async def released() -> bool:
        return client.app[hub_key].listeners_of(Keys().channel("late")) == 0

    await wait_for(released)
