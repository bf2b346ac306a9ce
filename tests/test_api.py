"""The session API over HTTP: publish (single and batch), status, delete, and real fan-out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as redis

from service import resources as r
from service.envelope import RESERVED_EVENTS
from service.keys import Keys
from service.redis.connections import RedisOpener
from service.sse import Event

from app_clients import AppClient, MakeSettings, StartClient
from sse_reader import SSEParser, collect
from waiting import wait_for

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    """An app with a publish token, no demo runs, on the shared in-memory Redis."""
    settings = make_settings(publish_tokens=[TOKEN], demo_runs=False)
    return await start_client(settings, fake_opener)


async def new_session(client: AppClient) -> str:
    response = await client.get("/sse/getSessionId")
    return str(await response.text())


async def publish(client: AppClient, session_id: str, body: Any) -> Any:
    response = await client.post(f"/sse/sessions/{session_id}/events", json=body, headers=AUTH)
    assert response.status == 202, await response.text()
    return await response.json()


async def status(client: AppClient, session_id: str) -> Any:
    response = await client.get(f"/sse/sessions/{session_id}", headers=AUTH)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_publish_returns_the_event_id_and_the_stream_delivers_it(client: AppClient) -> None:
    session_id = await new_session(client)
    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        reply = await publish(client, session_id, {"event": "payment", "data": {"ok": True}})
        await publish(client, session_id, {"event": "finish", "data": "bye"})
        events = await collect(stream)
    assert events[0].id == reply["id"]
    assert (events[0].event, events[0].data) == ("payment", '{"ok":true}')
    assert events[-1].event == "finish"


async def test_batch_publish_returns_ids_in_order_and_they_replay(client: AppClient) -> None:
    session_id = await new_session(client)
    reply = await publish(
        client, session_id, [{"data": "one"}, {"data": "two"}, {"event": "finish", "data": "3"}]
    )
    assert len(reply["ids"]) == 3
    # Published before anyone connected: a fresh connect replays the log (no demo runs).
    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        events = await collect(stream)
    assert [e.id for e in events] == reply["ids"]
    assert [e.data for e in events] == ["one", "two", "3"]


async def test_status_reports_ttl_subscribers_and_last_event(client: AppClient) -> None:
    session_id = await new_session(client)
    fresh = await status(client, session_id)
    assert fresh["sessionId"] == session_id
    assert 0 < fresh["ttlMs"] <= 30_000
    assert (fresh["subscribers"], fresh["localStreams"]) == (0, 0)
    assert (fresh["finished"], fresh["lastEventId"]) == (False, None)

    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        live = await status(client, session_id)
        assert (live["subscribers"], live["localStreams"]) == (1, 1)
        reply = await publish(client, session_id, {"event": "finish", "data": "done"})
        await collect(stream)
    done = await status(client, session_id)
    assert (done["finished"], done["lastEventId"]) == (True, reply["id"])


async def test_status_of_an_unknown_session_is_404(client: AppClient) -> None:
    response = await client.get("/sse/sessions/neverIssued", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["error"] == "session_not_found"


async def test_delete_sends_finish_closes_streams_and_removes_keys(
    client: AppClient, fake_opener: RedisOpener, make_settings: MakeSettings
) -> None:
    session_id = await new_session(client)
    await publish(client, session_id, {"data": "before"})
    inspector = await fake_opener(make_settings())
    await inspector.zadd(Keys().runs, {session_id: 0})
    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        parser = SSEParser()
        first = await collect(stream, until=1, parser=parser)
        response = await client.delete(f"/sse/sessions/{session_id}", headers=AUTH)
        assert response.status == 204
        rest = await collect(stream, parser=parser)
    assert [e.data for e in first] == ["before"]
    assert [(e.event, e.data) for e in rest] == [("finish", "session deleted")]
    assert await inspector.exists(*Keys().session_keys(session_id)) == 0
    assert await inspector.zscore(Keys().runs, session_id) is None
    gone = await client.get(f"/sse/sessions/{session_id}", headers=AUTH)
    assert gone.status == 404
    # A repeated DELETE (say, a retry after a timeout) is answered as the first one was.
    again = await client.delete(f"/sse/sessions/{session_id}", headers=AUTH)
    assert again.status == 204
    never = await client.delete("/sse/sessions/neverIssued", headers=AUTH)
    assert never.status == 404
    await inspector.aclose()


async def test_delete_stops_a_running_demo_producer(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    settings = make_settings(publish_tokens=[TOKEN], producer_interval_ms=50)
    client = await start_client(settings, fake_opener)
    session_id = await new_session(client)
    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        parser = SSEParser()
        await collect(stream, until=1, parser=parser)
        response = await client.delete(f"/sse/sessions/{session_id}", headers=AUTH)
        assert response.status == 204
        rest = await collect(stream, parser=parser)
    assert rest[-1].data == "session deleted"
    inspector = await fake_opener(settings)
    # The run lost its lease with the keys: nothing more is published to the session.
    await wait_for(lambda: _no_active_runs(client))
    assert await inspector.exists(Keys().log(session_id)) == 0
    await inspector.aclose()


async def _no_active_runs(client: AppClient) -> bool:
    return bool(client.app[r.producer_key].active_runs == 0)


def _payload() -> str:
    """Exactly 64 KiB of UTF-8 with newlines, accents, CJK, emoji and a leading space."""
    line = " leading space, tab\t, ü é ß, 漢字, 🚀✓, quotes \"' and <html>\n"
    text = line * (65536 // len(line.encode()))
    return text + "x" * (65536 - len(text.encode()))


@pytest.mark.redis
async def test_payload_arrives_byte_exact_at_two_subscribers_on_two_instances(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False)
    first, second = await start_client(settings), await start_client(settings)
    session_id = await new_session(first)
    data = _payload()
    assert len(data.encode()) == 65536

    async def read_raw(client: AppClient, started: asyncio.Event) -> bytes:
        async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
            started.set()
            async with asyncio.timeout(10):
                return bytes(await response.read())

    started = [asyncio.Event(), asyncio.Event()]
    readers = [
        asyncio.create_task(read_raw(c, s)) for c, s in zip((first, second), started, strict=True)
    ]
    async with asyncio.timeout(10):
        await asyncio.gather(*(s.wait() for s in started))
    batch = [{"event": "blob", "data": data}, {"event": "finish", "data": "end"}]
    reply = await publish(second, session_id, batch)
    bodies = await asyncio.gather(*readers)

    blob_id, finish_id = reply["ids"]
    expected = Event(data=data, event="blob", id=blob_id).encode()
    for body in bodies:
        assert expected in body
        events = SSEParser().feed(body.decode())
        assert [(e.event, e.id) for e in events] == [("blob", blob_id), ("finish", finish_id)]
        assert events[0].data == data


async def test_publishing_after_finish_is_refused_and_logs_nothing(
    client: AppClient, fake_opener: RedisOpener, make_settings: MakeSettings
) -> None:
    session_id = await new_session(client)
    await publish(client, session_id, [{"data": "last words"}, {"event": "finish", "data": "end"}])
    inspector = await fake_opener(make_settings())
    logged_before = await inspector.xlen(Keys().log(session_id))
    for body in ({"data": "too late"}, [{"data": "a"}, {"event": "finish", "data": "b"}]):
        response = await client.post(f"/sse/sessions/{session_id}/events", json=body, headers=AUTH)
        assert response.status == 409
        assert (await response.json())["error"] == "session_finished"
    assert await inspector.xlen(Keys().log(session_id)) == logged_before
    await inspector.aclose()


async def test_a_finish_must_be_the_last_event_of_a_batch(client: AppClient) -> None:
    session_id = await new_session(client)
    response = await client.post(
        f"/sse/sessions/{session_id}/events",
        json=[{"event": "finish", "data": "end"}, {"data": "after the end"}],
        headers=AUTH,
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_event"
    assert (await status(client, session_id))["lastEventId"] is None


@pytest.mark.parametrize("name", sorted(RESERVED_EVENTS))
async def test_a_reserved_event_name_is_refused_and_nothing_is_published(
    client: AppClient, name: str
) -> None:
    # `error` and `open` are EventSource's own events: a listener could not tell them apart.
    session_id = await new_session(client)
    for body in ({"event": name, "data": "x"}, [{"data": "fine"}, {"event": name, "data": "x"}]):
        response = await client.post(f"/sse/sessions/{session_id}/events", json=body, headers=AUTH)
        assert response.status == 400
        assert response.content_type == "application/json"
        error = await response.json()
        assert error["error"] == "invalid_event"
        assert f"'{name}' is reserved" in error["detail"]
    assert (await status(client, session_id))["lastEventId"] is None


async def test_a_new_demo_run_takes_events_again_after_the_last_one_finished(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(publish_tokens=[TOKEN]), fake_opener)
    session_id = await new_session(client)
    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        assert (await collect(stream))[-1].event == "finish"
    refused = await client.post(
        f"/sse/sessions/{session_id}/events", json={"data": "x"}, headers=AUTH
    )
    assert refused.status == 409
    async with client.get("/sse/connect", params={"sessionId": session_id}) as stream:
        await collect(stream, until=1)  # a fresh connect started a new run
        reply = await publish(client, session_id, {"event": "aside", "data": "x"})
        rest = await collect(stream)
    assert reply["id"] in [e.id for e in rest]
