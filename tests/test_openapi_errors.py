"""Every error answer the OpenAPI document promises, produced by a real request.

Each documented (operation, status, code) has a witness here: a request that gets exactly that
answer from an app built by the production factory on a shared in-memory Redis. A code the
document names that no witness produces fails, and so does a witness of an answer the document
does not name. The few answers a test cannot bring about here are listed, with where they are
tested instead.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
from multidict import CIMultiDict

from service.openapi import Spec, build_document
from service.redis.connections import RedisOpener
from service.resources import redis_key

from app_clients import AppClient, MakeSettings, StartClient
from signing import HS_SECRET, claims, hs256_key, sign

TOKEN = "openapi-errors-token-0123456789"
KEY = hs256_key("k1")
SESSION = "s1"
EVENTS = f"/sse/sessions/{SESSION}/events"
STATUS = f"/sse/sessions/{SESSION}"
EXTERNAL = "redis://127.0.0.1:1/0"  # never dialled: the fake opener ignores it
BASE: dict[str, Any] = {
    "publish_tokens": [TOKEN],
    "token_hs256_secrets": [f"{KEY.kid}:{HS_SECRET}"],
    "demo_runs": False,
    "session_ttl_s": 5.0,
}
TOKEN_MODE: dict[str, Any] = {**BASE, "subscribe_auth": "token", "redis_url": EXTERNAL}
# (operation, status, code) the suite produces elsewhere, and why not here.
ELSEWHERE = {
    ("publishEvents", "503", "outcome_unknown"): "Redis must take the command and not confirm "
    "it in time: tests/test_exactly_once.py pauses a real redis-server for that",
    ("deleteSession", "503", "outcome_unknown"): "as for publishEvents",
}


@dataclass
class Harness:
    """Starts apps on one in-memory Redis, with the base settings plus overrides."""

    start_client: StartClient
    make_settings: MakeSettings
    opener: RedisOpener
    server: fakeredis.FakeServer

    async def client(self, **overrides: Any) -> AppClient:
        settings = self.make_settings(**{**BASE, **overrides})
        return await self.start_client(settings, self.opener)

    async def redis_down(self, client: Any) -> None:
        """Redis refuses connections, and those the app holds are gone, as when a real
        server stops (a warm pooled connection would otherwise take the command and fail
        after sending it: outcome unknown, not unavailable)."""
        self.server.connected = False
        await client.app[redis_key].connection_pool.disconnect()


# A witness returns the answer: an aiohttp client response, or a `_Raw` read off a socket.
Witness = Callable[[Harness], Awaitable[Any]]
WITNESSES: dict[tuple[str, str, str], Witness] = {}


def witness(operation: str, status: int, code: str) -> Callable[[Witness], Witness]:
    def register(function: Witness) -> Witness:
        WITNESSES[(operation, str(status), code)] = function
        return function

    return register


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


AUTH = bearer(TOKEN)


def signed(**scopes: Any) -> str:
    """A current token (signed when the witness runs, so it is still valid)."""
    return sign(KEY, claims(**scopes))


def expired_token() -> str:
    return sign(KEY, claims(publish=[SESSION], subscribe=[SESSION], ttl_s=-3600))


SESSION_API = {
    "publishEvents": ("POST", EVENTS, {"json": {"data": "x"}}),
    "deleteSession": ("DELETE", STATUS, {}),
    "getSessionStatus": ("GET", STATUS, {}),
}


def session_api_witnesses(operation: str, method: str, path: str, body: dict[str, Any]) -> None:
    """The answers the three session API operations share."""

    def call(token: Callable[[], str], at: str = path, **overrides: Any) -> Witness:
        async def run(h: Harness) -> Any:
            client = await h.client(**overrides)
            given = token()
            headers = bearer(given) if given else {}
            return await client.request(method, at, headers=headers, **body)

        return run

    witness(operation, 400, "invalid_parameter")(
        call(lambda: TOKEN, at=path.replace(SESSION, "x" * 65))
    )
    witness(operation, 401, "unauthorized")(call(lambda: ""))
    witness(operation, 401, "invalid_token")(call(lambda: "not.a.token"))
    witness(operation, 401, "token_expired")(call(expired_token))
    witness(operation, 403, "insufficient_scope")(call(lambda: signed(publish=["other"])))
    witness(operation, 403, "publishing_disabled")(
        call(lambda: TOKEN, publish_tokens=[], token_hs256_secrets=[], redis_url=EXTERNAL)
    )

    @witness(operation, 503, "unavailable")
    async def unavailable(h: Harness) -> Any:
        client = await h.client()
        await h.redis_down(client)
        return await client.request(method, path, headers=AUTH, **body)


for _operation, (_method, _path, _body) in SESSION_API.items():
    session_api_witnesses(_operation, _method, _path, _body)


async def publish(
    h: Harness, body: bytes, headers: dict[str, str] | None = None, **overrides: Any
) -> Any:
    client = await h.client(**overrides)
    headers = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    return await client.post(EVENTS, data=body, headers=headers)


@witness("publishEvents", 400, "malformed_body")
async def undecodable(h: Harness) -> Any:
    return await publish(h, b"not gzip", {"Content-Encoding": "gzip"})


@witness("publishEvents", 400, "malformed_json")
async def not_json(h: Harness) -> Any:
    return await publish(h, b'{"data": 1e999}')


@witness("publishEvents", 400, "invalid_event")
async def reserved_name(h: Harness) -> Any:
    return await publish(h, b'{"event": "gap", "data": 1}')


@witness("publishEvents", 404, "session_not_found")
async def never_issued(h: Harness) -> Any:
    return await publish(h, b'{"data": 1}', require_issued_session=True)


@witness("publishEvents", 408, "request_timeout")
async def body_never_sent(h: Harness) -> Any:
    client = await h.client(body_timeout_s=0.2)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"POST {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            answer = await reader.read()
    finally:
        writer.close()
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return _Raw(int(lines[0].split()[1]), CIMultiDict(fields), answer)


@witness("publishEvents", 409, "session_finished")
async def after_finish(h: Harness) -> Any:
    first = await publish(h, b'{"event": "finish", "data": 1}')
    assert first.status == 202
    return await publish(h, b'{"data": 1}')


@witness("publishEvents", 413, "payload_too_large")
async def large_body(h: Harness) -> Any:
    return await publish(
        h, gzip.compress(b" " * 4096), {"Content-Encoding": "gzip"}, max_body_bytes=2048
    )


@witness("publishEvents", 413, "event_too_large")
async def large_event(h: Harness) -> Any:
    return await publish(h, b'{"data": "' + b"x" * 100 + b'"}', max_event_bytes=64)


@witness("publishEvents", 415, "unsupported_media_type")
async def plain_text(h: Harness) -> Any:
    return await publish(h, b"x", {"Content-Type": "text/plain"})


@witness("publishEvents", 422, "idempotency_key_reused")
async def key_reused(h: Harness) -> Any:
    first = await publish(h, b'{"data": 1}', {"Idempotency-Key": "k"})
    assert first.status == 202
    return await publish(h, b'{"data": 2}', {"Idempotency-Key": "k"})


@witness("deleteSession", 404, "session_not_found")
async def delete_unknown(h: Harness) -> Any:
    return await (await h.client()).delete(STATUS, headers=AUTH)


@witness("getSessionStatus", 404, "session_not_found")
async def status_unknown(h: Harness) -> Any:
    return await (await h.client()).get(STATUS, headers=AUTH)


@witness("getSessionId", 429, "rate_limited")
async def too_many_ids(h: Harness) -> Any:
    client = await h.client(session_rate_per_s=0.001, session_burst=1)
    assert (await client.get("/sse/getSessionId")).status == 200
    return await client.get("/sse/getSessionId")


@witness("getSessionId", 503, "unavailable")
async def no_redis_for_ids(h: Harness) -> Any:
    client = await h.client()
    await h.redis_down(client)
    return await client.get("/sse/getSessionId")


def connect(client: Any, session_id: str = SESSION, **kwargs: Any) -> Any:
    return client.get("/sse/connect", params={"sessionId": session_id}, **kwargs)


@witness("connect", 400, "invalid_parameter")
async def no_session_id(h: Harness) -> Any:
    return await (await h.client()).get("/sse/connect")


@witness("connect", 404, "session_not_found")
async def connect_unknown(h: Harness) -> Any:
    return await connect(await h.client(require_issued_session=True))


async def second_stream(client: Any, session_id: str, first: str = SESSION) -> Any:
    """A connect while a first stream is open (it is closed once the answer is in)."""
    opened = await connect(client, first)
    assert opened.status == 200
    try:
        return await connect(client, session_id)
    finally:
        opened.close()


@witness("connect", 429, "too_many_session_connections")
async def session_full(h: Harness) -> Any:
    return await second_stream(await h.client(max_connections_per_session=1), SESSION)


@witness("connect", 429, "rate_limited")
async def too_many_runs(h: Harness) -> Any:
    client = await h.client(demo_runs=True, run_rate_per_s=0.001, run_burst=1)
    return await second_stream(client, "s2")


@witness("connect", 503, "too_many_connections")
async def worker_full(h: Harness) -> Any:
    return await second_stream(await h.client(max_connections=1), "s2")


@witness("connect", 503, "unavailable")
async def no_redis_for_streams(h: Harness) -> Any:
    client = await h.client()
    await h.redis_down(client)
    return await connect(client)


def subscriber(token: Callable[[], str]) -> Witness:
    async def run(h: Harness) -> Any:
        client = await h.client(**TOKEN_MODE)
        given = token()
        headers = bearer(given) if given else {}
        return await connect(client, headers=headers)

    return run


witness("connect", 401, "unauthorized")(subscriber(lambda: ""))
witness("connect", 401, "invalid_token")(subscriber(lambda: "not.a.token"))
witness("connect", 401, "token_expired")(subscriber(expired_token))
witness("connect", 403, "insufficient_scope")(subscriber(lambda: signed(subscribe=["other"])))


@witness("mintDemoToken", 400, "invalid_parameter")
async def bad_demo_ttl(h: Harness) -> Any:
    client = await h.client()
    return await client.post("/dev/token", params={"sessionId": SESSION, "ttlS": "0"})


@dataclass
class _Raw:
    """An answer read off a raw socket, with the parts a witness check looks at."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    async def json(self) -> Any:
        return json.loads(self.body)


_CODE = re.compile(r"(?:^|; )`([a-z_]+)`: ")


def documented_errors(document: Spec) -> set[tuple[str, str, str]]:
    """(operation, status, code) of every error answer the document names."""
    found = set()
    for item in document["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict) or "operationId" not in operation:
                continue
            for status, answer in operation["responses"].items():
                for code in _CODE.findall(answer.get("description", "")):
                    found.add((operation["operationId"], status, code))
    return found


def documented_answers(make_settings: MakeSettings) -> dict[tuple[str, str], Spec]:
    """(operation, status) -> the documented answer, from the open and the token document."""
    answers = {}
    for overrides in (TOKEN_MODE, BASE):
        document = build_document(make_settings(**overrides))
        for item in document["paths"].values():
            for operation in item.values():
                if isinstance(operation, dict) and "operationId" in operation:
                    for status, answer in operation["responses"].items():
                        answers[(operation["operationId"], status)] = _resolved(document, answer)
    return answers


def _resolved(document: Spec, node: Any) -> Any:
    """`node` with every local `$ref` in it replaced by what it names."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolved(document, target)
        return {key: _resolved(document, value) for key, value in node.items()}
    return node


def test_every_documented_error_has_a_witness_and_no_other(make_settings: MakeSettings) -> None:
    documented = documented_errors(build_document(make_settings(**BASE))) | documented_errors(
        build_document(make_settings(**TOKEN_MODE))
    )
    assert documented - set(ELSEWHERE) == set(WITNESSES)


@pytest.fixture
def harness(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    fake_server: fakeredis.FakeServer,
) -> Harness:
    return Harness(start_client, make_settings, fake_opener, fake_server)


@pytest.mark.parametrize(("operation", "status", "code"), sorted(WITNESSES))
async def test_the_documented_error_happens(
    harness: Harness, operation: str, status: str, code: str
) -> None:
    response = await WITNESSES[(operation, status, code)](harness)
    body = await response.json()
    assert (response.status, body["error"]) == (int(status), code), body
    # And with every header the document says this answer always carries.
    documented = documented_answers(harness.make_settings)[(operation, status)]
    for name, header in documented.get("headers", {}).items():
        if header.get("required"):
            assert name in response.headers, f"{name} missing from {code}"
