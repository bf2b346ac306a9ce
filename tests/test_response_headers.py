"""What every response says to caches and to CORS: no-store for per-client answers, Vary: Origin.

A session id is the session's only secret, and a stream, a `204` after `finish` and an error
belong to the client that asked: a shared cache must keep none of them. CORS answers echo
the request's `Origin`, so every response varies by it.
"""

from __future__ import annotations

from typing import Any

import pytest

from service.redis.connections import RedisOpener
from service.settings import SettingsError, build_settings, load_settings

from app_clients import AppClient, MakeSettings, StartClient
from sse_reader import collect

TOKEN = "headers-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP_ORIGIN = "https://app.example"


@pytest.fixture
async def client(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    settings = make_settings(
        publish_tokens=[TOKEN], demo_runs=False, session_rate_per_s=1 / 3600, session_burst=2
    )
    return await start_client(settings, fake_opener)


def varies_by_origin(response: Any) -> bool:
    vary = response.headers.get("Vary", "")
    return "origin" in {v.strip().lower() for v in vary.split(",")}


async def finished_session(client: AppClient) -> tuple[str, str]:
    session_id = await (await client.get("/sse/getSessionId")).text()
    reply = await client.post(
        f"/sse/sessions/{session_id}/events", json={"event": "finish", "data": "x"}, headers=AUTH
    )
    return session_id, (await reply.json())["id"]


@pytest.mark.parametrize("origin", [None, APP_ORIGIN])
async def test_per_client_answers_are_no_store_and_vary_by_origin(
    client: AppClient, origin: str | None
) -> None:
    headers = {"Origin": origin} if origin else {}
    session_id, finish_id = await finished_session(client)  # the first of two session ids
    answers = {
        "session id": await client.get("/sse/getSessionId", headers=headers),
        "204 after finish": await client.get(
            "/sse/connect",
            params={"sessionId": session_id},
            headers={**headers, "Last-Event-ID": finish_id},
        ),
        "429": await client.get("/sse/getSessionId", headers=headers),
        "400": await client.get("/sse/connect", headers=headers),
        "404": await client.get("/no/such/route", headers=headers),
        "session status": await client.get(
            f"/sse/sessions/{session_id}", headers={**headers, **AUTH}
        ),
        "publish reply": await client.post(
            f"/sse/sessions/{session_id}/events", json={"data": "y"}, headers={**headers, **AUTH}
        ),
        "readiness": await client.get("/readyz", headers=headers),
    }
    assert [answers[name].status for name in ("session id", "204 after finish", "429")] == [
        200,
        204,
        429,
    ]
    for name, response in answers.items():
        assert response.headers.get("Cache-Control") == "no-store", name
        assert varies_by_origin(response), name


async def test_the_stream_is_no_store_and_varies_by_origin(client: AppClient) -> None:
    session_id, _ = await finished_session(client)
    async with client.get(
        "/sse/connect", params={"sessionId": session_id}, headers={"Origin": APP_ORIGIN}
    ) as stream:
        assert stream.headers["Cache-Control"] == "no-store"
        assert varies_by_origin(stream)
        assert [e.event for e in await collect(stream)] == ["finish"]


async def test_static_files_keep_their_own_cache_policy(client: AppClient) -> None:
    for path in ("/", "/app.js", "/style.css"):
        response = await client.get(path)
        assert response.headers["Cache-Control"] == "no-cache", path
        assert varies_by_origin(response), path


async def test_a_preflight_varies_by_origin(client: AppClient) -> None:
    preflight = await client.options(
        "/sse/connect",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert preflight.status == 200
    assert varies_by_origin(preflight)


@pytest.fixture
async def credentialed(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> Any:
    settings = make_settings(cors_origins=[APP_ORIGIN], cors_credentials=True, demo_runs=False)
    return await start_client(settings, fake_opener)


async def test_a_configured_origin_may_send_credentials(credentialed: Any) -> None:
    response = await credentialed.get("/sse/getSessionId", headers={"Origin": APP_ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    preflight = await credentialed.options(
        "/sse/connect",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"


async def test_another_origin_gets_no_cors_headers_at_all(credentialed: Any) -> None:
    response = await credentialed.get(
        "/sse/getSessionId", headers={"Origin": "https://evil.example"}
    )
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert varies_by_origin(response)


async def test_credentials_are_off_by_default(client: AppClient) -> None:
    response = await client.get("/sse/getSessionId", headers={"Origin": APP_ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_credentials_with_a_wildcard_origin_stop_the_process_with_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="'cors_credentials' cannot be true while"):
        build_settings({"cors_credentials": True})
    with pytest.raises(SettingsError, match="list the origins"):
        load_settings(None, {"SSE_CORS_CREDENTIALS": "true", "SSE_CORS_ORIGINS": f"{APP_ORIGIN},*"})
    assert load_settings(
        None, {"SSE_CORS_CREDENTIALS": "true", "SSE_CORS_ORIGINS": APP_ORIGIN}
    ).cors_credentials


@pytest.mark.parametrize(
    "origin", ["https://app.example/", "app.example", "https://app.example/path", ""]
)
def test_an_origin_that_no_browser_sends_is_refused(origin: str) -> None:
    with pytest.raises(SettingsError, match="cors_origins"):
        build_settings({"cors_origins": [origin]})
