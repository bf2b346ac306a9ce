"""Who may use the session API: tokens, the open embedded mode, the disabled mode, no leaks."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from service.auth import AccessPolicy, access_policy, token_matches
from service.redis.connections import RedisOpener

from app_clients import AppClient, MakeSettings, StartClient
from signing import claims, hs256_key, sign

TOKEN = "right-token-0123456789"
OTHER = "second-token-abcdefghij"
WRONG = "wrong-token-9876543210"
EXTERNAL = "redis://127.0.0.1:1/0"  # only decides the policy; the fake opener ignores it
BODY = {"data": "x"}


def test_token_matches_any_configured_token() -> None:
    assert token_matches(TOKEN, (OTHER, TOKEN))
    assert token_matches(OTHER, (OTHER, TOKEN))
    assert not token_matches(WRONG, (OTHER, TOKEN))
    assert not token_matches(TOKEN[:-1], (TOKEN,))
    assert not token_matches("ü" * 20, (TOKEN,))
    assert not token_matches(TOKEN, ())


@pytest.mark.parametrize(
    ("overrides", "policy"),
    [
        ({"publish_tokens": [TOKEN]}, AccessPolicy.TOKEN),
        ({"publish_tokens": [TOKEN], "redis_url": EXTERNAL}, AccessPolicy.TOKEN),
        ({}, AccessPolicy.OPEN),
        ({"redis_url": EXTERNAL}, AccessPolicy.DISABLED),
    ],
)
def test_access_policy(make_settings: MakeSettings, overrides: Any, policy: AccessPolicy) -> None:
    assert access_policy(make_settings(**overrides)) is policy


@pytest.fixture
async def guarded(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    settings = make_settings(publish_tokens=[OTHER, TOKEN], demo_runs=False)
    return await start_client(settings, fake_opener)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sse/sessions/abc/events"),
        ("GET", "/sse/sessions/abc"),
        ("DELETE", "/sse/sessions/abc"),
    ],
)
async def test_missing_token_is_401_with_challenge(
    guarded: AppClient, method: str, path: str
) -> None:
    response = await guarded.request(method, path, json=BODY)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert (await response.json())["error"] == "unauthorized"


@pytest.mark.parametrize(
    "header", [f"Bearer {WRONG}", f"Basic {TOKEN}", "Bearer", "Bearer ", TOKEN, "Bearer ü€"]
)
async def test_wrong_token_is_401(guarded: AppClient, header: str) -> None:
    response = await guarded.post(
        "/sse/sessions/abc/events", json=BODY, headers={"Authorization": header}
    )
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    body = await response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "unauthorized"


@pytest.mark.parametrize("token", [TOKEN, OTHER])
async def test_right_token_publishes(guarded: AppClient, token: str) -> None:
    response = await guarded.post(
        "/sse/sessions/abc/events", json=BODY, headers={"Authorization": f"bearer {token}"}
    )
    assert response.status == 202


async def test_embedded_mode_without_tokens_is_open(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(), fake_opener)
    response = await client.post("/sse/sessions/abc/events", json=BODY)
    assert response.status == 202


async def test_external_redis_without_tokens_disables_the_api(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(redis_url=EXTERNAL), fake_opener)
    for method, path in [
        ("POST", "/sse/sessions/abc/events"),
        ("GET", "/sse/sessions/abc"),
        ("DELETE", "/sse/sessions/abc"),
    ]:
        response = await client.request(method, path, json=BODY)
        assert response.status == 403
        assert (await response.json())["error"] == "publishing_disabled"
    # Subscribing still works: it needs only the session id.
    assert (await client.get("/sse/getSessionId")).status == 200


async def test_tokens_never_reach_the_logs(
    guarded: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for token in (TOKEN, WRONG):
        headers = {"Authorization": f"Bearer {token}"}
        await guarded.post("/sse/sessions/abc/events", json=BODY, headers=headers)
        await guarded.get("/sse/sessions/abc", headers=headers)
        await guarded.delete("/sse/sessions/abc", headers=headers)
        await guarded.post("/sse/sessions/bad!/events", data="{", headers=headers)
    assert caplog.records, "the requests above should have logged something"
    logged = caplog.text + "".join(f"{r.args!r}{r.getMessage()}" for r in caplog.records)
    for secret in (TOKEN, WRONG, OTHER):
        assert secret not in logged


# Signed publisher tokens: the `publish` scope of the same JWT form subscribers use.

SECRET = "publisher-signing-secret-0123456789"


@pytest.fixture
async def signed(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    settings = make_settings(
        publish_tokens=[TOKEN], token_hs256_secrets=[f"pub:{SECRET}"], demo_runs=False,
        token_leeway_s=0, redis_url=EXTERNAL,
    )  # fmt: skip
    return await start_client(settings, fake_opener)


def publisher_token(
    *sessions: str, scope: str = "publish", ttl_s: float = 60, secret: str = SECRET
) -> str:
    body = claims(**{scope: list(sessions)}, ttl_s=ttl_s)
    return sign(hs256_key("pub", secret), body)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_keys_alone_guard_the_api(make_settings: MakeSettings) -> None:
    settings = make_settings(token_hs256_secrets=[f"pub:{SECRET}"], redis_url=EXTERNAL)
    assert access_policy(settings) is AccessPolicy.TOKEN


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/sse/sessions/room-1/events", 202),
        ("GET", "/sse/sessions/room-1", 200),
        ("DELETE", "/sse/sessions/room-1", 204),
    ],
)
async def test_a_publish_token_for_the_session_is_accepted(
    signed: AppClient, method: str, path: str, status: int
) -> None:
    await signed.post("/sse/sessions/room-1/events", json=BODY, headers=bearer(TOKEN))
    response = await signed.request(
        method, path, json=BODY, headers=bearer(publisher_token("room-*"))
    )
    assert response.status == status


async def test_a_publish_token_is_scoped_to_its_sessions(signed: AppClient) -> None:
    url = "/sse/sessions/other/events"
    response = await signed.post(url, json=BODY, headers=bearer(publisher_token("room-*")))
    assert response.status == 403
    assert (await response.json())["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    # A subscriber's token is no publisher's.
    subscriber = publisher_token("other", scope="subscribe")
    assert (await signed.post(url, json=BODY, headers=bearer(subscriber))).status == 403


async def test_a_bad_or_expired_publish_token_is_401(signed: AppClient) -> None:
    url = "/sse/sessions/room-1/events"
    expired = await signed.post(url, json=BODY, headers=bearer(publisher_token("*", ttl_s=-5)))
    assert expired.status == 401
    assert (await expired.json())["error"] == "token_expired"
    forged = publisher_token("*", secret="f" * 40)
    response = await signed.post(url, json=BODY, headers=bearer(forged))
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"].startswith(
        'Bearer realm="sse-fanout", error="invalid_token"'
    )
    # The static tokens still work beside the signed ones.
    assert (await signed.post(url, json=BODY, headers=bearer(TOKEN))).status == 202


async def test_without_token_keys_a_signed_token_is_just_a_wrong_token(
    guarded: AppClient,
) -> None:
    response = await guarded.post(
        "/sse/sessions/abc/events", json=BODY, headers=bearer(publisher_token("*"))
    )
    assert response.status == 401
    assert (await response.json())["error"] == "unauthorized"
