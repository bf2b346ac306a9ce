"""Who may open a stream: open mode, tokens from header, query or cookie, expiry, rotation, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.test_utils import TestServer

from service import resources as r
from service.app import create_app
from service.mailbox import StreamEnd
from service.redis.connections import RedisOpener
from service.settings import Settings
from service.token_keys import DEMO_KEY_ID

from app_clients import AppClient, MakeSettings, StartClient
from signing import HS_SECRET, KeyPair, claims, ec_key, ed_key, hs256_key, jwks, raw_token, sign
from sse_reader import SSEParser, collect
from waiting import wait_for

KEY = hs256_key("hs1")
EVENT_SOURCE = {"Accept": "text/event-stream"}
CHALLENGE = 'Bearer realm="sse-fanout"'


def token_for(*sessions: str, key: KeyPair = KEY, **extra: Any) -> str:
    return sign(key, claims(subscribe=list(sessions), **extra))


def carried(token: str, via: str) -> dict[str, Any]:
    """Request arguments that carry `token` the way `via` says."""
    if via == "header":
        return {"headers": {"Authorization": f"Bearer {token}"}}
    if via == "query":
        return {"params": {"access_token": token}}
    return {"headers": {"Cookie": f"sse_token={token}"}}


def connect(
    client: AppClient,
    session_id: str,
    token: str | None = None,
    via: str = "header",
    headers: dict[str, str] | None = None,
) -> Any:
    kwargs = carried(token, via) if token is not None else {}
    kwargs["params"] = {"sessionId": session_id, **kwargs.get("params", {})}
    kwargs["headers"] = {**kwargs.get("headers", {}), **(headers or {})}
    return client.get("/sse/connect", **kwargs)


async def first_bytes(response: Any) -> bytes:
    async with asyncio.timeout(5):
        data: bytes = await response.content.readuntil(b": connected\n")
        return data


@pytest.fixture
def token_settings(make_settings: MakeSettings) -> MakeSettings:
    def make(**overrides: Any) -> Settings:
        return make_settings(
            **{
                "subscribe_auth": "token",
                "token_hs256_secrets": [f"hs1:{HS_SECRET}"],
                "token_leeway_s": 0,
                "demo_runs": False,
                **overrides,
            }
        )

    return make


@pytest.fixture
async def client(
    start_client: StartClient, token_settings: MakeSettings, fake_opener: RedisOpener
) -> AppClient:
    return await start_client(token_settings(), fake_opener)


async def test_open_mode_ignores_tokens(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(demo_runs=False), fake_opener)
    for via in ("header", "query", "cookie"):
        async with connect(client, "s1", "garbage", via) as response:
            assert response.status == 200
            await first_bytes(response)
    async with connect(client, "s1") as response:
        assert response.status == 200


async def test_a_missing_token_is_401_with_a_bare_challenge(client: AppClient) -> None:
    response = await connect(client, "s1")
    assert response.status == 401
    # RFC 6750 section 3.1: no error code when the request carried no credentials at all.
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    body = await response.json()
    assert body["error"] == "unauthorized"
    assert "access_token" in body["detail"]
    assert "sse_token" in body["detail"]
    # An Authorization header of another scheme is no token either.
    response = await connect(client, "s1", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status == 401


@pytest.mark.parametrize("via", ["header", "query", "cookie"])
async def test_a_token_is_accepted_from_each_place(client: AppClient, via: str) -> None:
    async with connect(client, "s1", token_for("s1"), via) as response:
        assert response.status == 200
        assert await first_bytes(response) == b"retry: 500\n: connected\n"


@pytest.mark.parametrize(
    ("places", "status"),
    [
        ({"header": "bad", "query": "good"}, 401),
        ({"header": "good", "cookie": "bad"}, 200),
        ({"query": "bad", "cookie": "good"}, 401),
        ({"query": "good", "cookie": "bad"}, 200),
        ({"header": "other", "cookie": "good"}, 403),
    ],
)
async def test_header_wins_over_query_wins_over_cookie(
    client: AppClient, places: dict[str, str], status: int
) -> None:
    values = {
        "good": token_for("s1"),
        "bad": token_for("s1")[:-4] + "AAAA",
        "other": token_for("s2"),
    }
    headers: dict[str, str] = {}
    params = {"sessionId": "s1"}
    for via, which in places.items():
        kwargs = carried(values[which], via)
        headers.update(kwargs.get("headers", {}))
        params.update(kwargs.get("params", {}))
    async with client.get("/sse/connect", params=params, headers=headers) as response:
        assert response.status == status


async def test_a_token_for_another_session_is_403(client: AppClient) -> None:
    response = await connect(client, "s2", token_for("s1", "s10"))
    assert response.status == 403
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith(f'{CHALLENGE}, error="insufficient_scope"')
    assert (await response.json())["error"] == "insufficient_scope"
    publish_only = sign(KEY, claims(publish=["s2"]))
    assert (await connect(client, "s2", publish_only)).status == 403


async def test_a_prefix_covers_the_ids_that_start_with_it(client: AppClient) -> None:
    token = token_for("room-*")
    for session_id in ("room-1", "room-", "room-abc_DEF"):
        async with connect(client, session_id, token) as response:
            assert response.status == 200
    for session_id in ("room", "roo", "xroom-1", "Room-1"):
        assert (await connect(client, session_id, token)).status == 403


@pytest.mark.parametrize(
    "make_token",
    [
        lambda: token_for("s1")[:-2],  # signature cut short
        lambda: raw_token({"alg": "none", "kid": "hs1"}, claims(subscribe=["s1"])),
        lambda: raw_token({"alg": "none"}, claims(subscribe=["s1"])),
        lambda: token_for("s1", key=hs256_key("hs1", "x" * 40)),  # forged with another secret
        lambda: token_for("s1", key=ed_key("hs1")),
        lambda: "not-a-token",
    ],
)
async def test_a_bad_token_is_401_invalid_token_and_never_echoed(
    client: AppClient, make_token: Any
) -> None:
    token = make_token()
    for headers in ({}, EVENT_SOURCE):
        response = await connect(client, "s1", token, "query", headers=headers)
        assert response.status == 401
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith(f'{CHALLENGE}, error="invalid_token", error_description="')
        body = await response.text()
        assert json.loads(body)["error"] == "invalid_token"
        for part in token.split("."):
            if len(part) > 8:
                assert part not in body
                assert part not in challenge


async def test_an_expired_token_is_204_to_eventsource_and_401_otherwise(client: AppClient) -> None:
    expired = token_for("s1", ttl_s=-5)
    response = await connect(client, "s1", expired, "cookie", headers=EVENT_SOURCE)
    assert response.status == 204
    assert await response.read() == b""
    response = await connect(client, "s1", expired, "cookie")
    assert response.status == 401
    assert (await response.json())["error"] == "token_expired"
    assert 'error_description="the token has expired"' in response.headers["WWW-Authenticate"]
    # An expired token for another session tells EventSource nothing to stop on: plain 401.
    response = await connect(client, "s2", expired, "cookie", headers=EVENT_SOURCE)
    assert response.status == 401


async def test_expiry_ends_the_stream_with_unauthorized_and_the_reconnect_gets_204(
    client: AppClient,
) -> None:
    token = token_for("s1", exp=int(time.time()) + 1)
    parser = SSEParser()
    started = time.time()
    async with connect(client, "s1", token, "query", headers=EVENT_SOURCE) as response:
        assert response.status == 200
        events = await collect(response, parser=parser, timeout_s=10)
    assert [e.event for e in events] == ["unauthorized"]
    assert events[0].id == ""  # no id: the resume point stays the last real event
    assert time.time() >= int(started) + 1
    metrics = client.app[r.stream_metrics_key]
    assert metrics.ended(StreamEnd.UNAUTHORIZED) == 1
    # What EventSource does next: the same URL, so the same token.
    again = await connect(client, "s1", token, "query", headers=EVENT_SOURCE)
    assert again.status == 204
    # And with a fresh token the application resumes where it was.
    async with connect(client, "s1", token_for("s1"), "query") as fresh:
        assert fresh.status == 200


@pytest.mark.parametrize("version", [HttpVersion11, HttpVersion10])
@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_a_busy_stream_ends_on_expiry_too(client: AppClient, version: HttpVersion) -> None:
    """Events arriving all the time must not keep an expired stream alive.

    HTTP/1.1 streams get live events written straight to the socket, HTTP/1.0 ones through
    the stream's task: both end. (test_stream_expiry.py keeps the task busy on every turn.)
    """
    publisher = client.app[r.publisher_key]
    token = token_for("busy", exp=int(time.time()) + 1)
    published = 0

    async def publish_until(done: asyncio.Event) -> None:
        nonlocal published
        for _ in range(2000):
            if done.is_set():
                return
            await publisher.publish("busy", "", f"tick {published}")
            published += 1
            await asyncio.sleep(0.005)

    done = asyncio.Event()
    session = aiohttp.ClientSession(version=version)
    request = session.get(
        client.make_url("/sse/connect"), params={"sessionId": "busy"},
        headers={**EVENT_SOURCE, "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    async with session, request as response:
        assert response.status == 200
        task = asyncio.create_task(publish_until(done))
        try:
            events = await collect(response, timeout_s=10)
            still_publishing = not task.done()
        finally:
            done.set()
            await task
    assert still_publishing, "the stream must end while events are still coming"
    assert events[-1].event == "unauthorized"
    ticks = [e.data for e in events[:-1]]
    assert len(ticks) > 10
    assert ticks == [f"tick {i}" for i in range(len(ticks))], "in order, none missing"


async def test_get_session_id_stays_open_and_the_id_alone_grants_nothing(client: AppClient) -> None:
    response = await client.get("/sse/getSessionId")
    assert response.status == 200
    session_id = await response.text()
    assert (await connect(client, session_id)).status == 401
    async with connect(client, session_id, token_for(session_id)) as stream:
        assert stream.status == 200


def replace_jwks(path: Path, *keys: KeyPair) -> None:
    """Write a new version of the file the way an operator should: a rename over the old."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(jwks(*keys))
    temporary.replace(path)


async def test_a_jwks_file_rewritten_while_running_rotates_the_keys(
    start_client: StartClient,
    token_settings: MakeSettings,
    fake_opener: RedisOpener,
    tmp_path: Path,
) -> None:
    old, new = ec_key("2024-a"), ed_key("2024-b")
    jwks_path = tmp_path / "keys.json"
    replace_jwks(jwks_path, old)
    settings = token_settings(
        token_hs256_secrets=[], token_jwks_path=str(jwks_path), token_jwks_check_s=0.05
    )
    client = await start_client(settings, fake_opener)
    async with connect(client, "s1", token_for("s1", key=old)) as response:
        assert response.status == 200
    assert (await connect(client, "s1", token_for("s1", key=new))).status == 401

    replace_jwks(jwks_path, new)

    async def new_key_works() -> bool:
        response = await connect(client, "s1", token_for("s1", key=new))
        response.close()
        return bool(response.status == 200)

    await wait_for(new_key_works, timeout_s=10)
    assert (await connect(client, "s1", token_for("s1", key=old))).status == 401


async def test_logs_never_hold_the_token_and_the_access_log_redacts_it(
    aiohttp_client: Any,
    token_settings: MakeSettings,
    fake_opener: RedisOpener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Served as `python -m service` serves it: aiohttp's own access log, which prints the
    # raw request line, is off (and its logger set to WARNING by logs.py).
    server = TestServer(create_app(token_settings(), fake_opener))
    await server.start_server(access_log=None)
    client = await aiohttp_client(server)
    good = token_for("s1", exp=int(time.time()) + 1)
    tokens = {
        "good": good,
        "forged": token_for("s1", key=hs256_key("hs1", "f" * 40)),
        "other": token_for("s2"),
    }
    with caplog.at_level(logging.DEBUG):
        async with connect(client, "s1", good, "query", headers=EVENT_SOURCE) as response:
            assert response.status == 200
            events = await collect(response, timeout_s=10)
        assert events[-1].event == "unauthorized"
        assert (await connect(client, "s1", good, "query", headers=EVENT_SOURCE)).status == 204
        assert (await connect(client, "s1", tokens["forged"], "query")).status == 401
        assert (await connect(client, "s1", tokens["other"], "query")).status == 403
        # Other spellings of the parameter name that decode to it are redacted too.
        spelled = await client.get(f"/sse/connect?sessionId=s1&access%5Ftoken={tokens['other']}")
        assert spelled.status == 403
        for via in ("header", "cookie"):
            assert (await connect(client, "s1", tokens["forged"], via)).status == 401
    everything = "\n".join(
        f"{record.getMessage()} {getattr(record, 'fields', '')} {record.args}"
        for record in caplog.records
    )
    for token in tokens.values():
        for part in token.split("."):
            assert part not in everything
    access = [r.getMessage() for r in caplog.records if r.name == "service.access_log"]
    assert len(access) == 7, access
    for line in access:
        assert "sessionId=s1" in line
    assert sum("access_token=[redacted]" in line for line in access) == 5
    assert sum("access%5Ftoken=[redacted]" in line for line in access) == 0  # normalized by yarl
    stream_end = [r for r in caplog.records if r.getMessage().startswith("stream end ")]
    assert [r.fields["reason"] for r in stream_end] == ["unauthorized"]  # type: ignore[attr-defined]


async def test_the_demo_token_endpoint_mints_for_one_session(
    start_client: StartClient, token_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(token_settings(), fake_opener)
    response = await client.post("/dev/token", params={"sessionId": "demo1", "ttlS": "5"})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["subscribeAuth"] == "token"
    assert abs(body["expiresAt"] - (time.time() + 5)) < 2
    async with connect(client, "demo1", body["token"], "query") as stream:
        assert stream.status == 200
    assert (await connect(client, "demo2", body["token"], "query")).status == 403
    for params in (
        {},
        {"sessionId": "a b"},
        {"sessionId": "a", "ttlS": "0"},
        {"sessionId": "a", "ttlS": "3601"},
        {"sessionId": "a", "ttlS": "9" * 5000},
        {"sessionId": "a", "ttlS": "١٢"},
    ):
        bad = await client.post("/dev/token", params=params)
        assert bad.status == 400, params
    # Its tokens only ever subscribe: the session API (guarded, as keys are configured) says no.
    publish = await client.post(
        "/sse/sessions/demo1/events", json={"data": "x"},
        headers={"Authorization": f"Bearer {body['token']}"},
    )  # fmt: skip
    assert publish.status == 403
    assert (await publish.json())["error"] == "insufficient_scope"
    assert (await client.get("/dev/token")).status == 405


async def test_the_demo_token_endpoint_exists_only_in_embedded_mode(
    start_client: StartClient, token_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    settings = token_settings(redis_url="redis://127.0.0.1:1/0")  # the fake opener ignores it
    client = await start_client(settings, fake_opener)
    response = await client.post("/dev/token", params={"sessionId": "demo1"})
    assert response.status == 404
    assert r.demo_signer_key not in client.app


async def test_a_publisher_cannot_send_the_unauthorized_event(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    client = await start_client(make_settings(demo_runs=False), fake_opener)
    for body in (
        {"event": "unauthorized", "data": "x"},
        [{"data": "fine"}, {"event": "unauthorized", "data": "x"}],
    ):
        response = await client.post("/sse/sessions/s1/events", json=body)
        assert response.status == 400
        body_json = await response.json()
        assert body_json["error"] == "invalid_event"
        assert "reserved" in body_json["detail"]


async def test_a_configured_key_wins_over_the_demo_key_of_the_same_id(
    start_client: StartClient, token_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    secret = "configured-under-the-demo-id-0123456"
    settings = token_settings(token_hs256_secrets=[f"{DEMO_KEY_ID}:{secret}"])
    client = await start_client(settings, fake_opener)
    token = token_for("s1", key=hs256_key(DEMO_KEY_ID, secret))
    async with connect(client, "s1", token) as response:
        assert response.status == 200


async def test_audience_and_issuer_when_configured(
    start_client: StartClient, token_settings: MakeSettings, fake_opener: RedisOpener
) -> None:
    settings = token_settings(token_audience="https://app.example", token_issuer="backend")
    client = await start_client(settings, fake_opener)
    good: dict[str, Any] = {"aud": "https://app.example", "iss": "backend"}
    async with connect(client, "s1", token_for("s1", **good)) as response:
        assert response.status == 200
    for wrong in (
        {**good, "aud": "https://other.example"},
        {**good, "iss": "intruder"},
        {"iss": "backend"},
        {"aud": "https://app.example"},
    ):
        response = await connect(client, "s1", token_for("s1", **wrong), headers=EVENT_SOURCE)
        assert response.status == 401, wrong
        assert (await response.json())["error"] == "invalid_token"
