"""The served OpenAPI document: valid, complete, readable at /docs, and true of the live API.

The fuzz part runs schemathesis against a real server on 127.0.0.1 (in a thread with its own
event loop, as schemathesis calls it synchronously), using the document that server serves.
Examples are bounded and derandomized. `/sse/connect` is fuzzed too: the server's sessions
live 0.1 s, so every stream it opens ends on its own within that.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from hypothesis import example, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.generation.meta import TestPhase
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.docs_page import render_document
from service.errors import ServiceError
from service.openapi import build_document
from service.sessions import BASE62, new_session_id
from service.settings import Settings, build_settings
from service.submission import MAX_BATCH_EVENTS, parse_body

from app_clients import MakeSettings, StartClient

# Processes or fuzzing for seconds: left out of the quick loop (README, "Test it").
pytestmark = pytest.mark.slow

TOKEN = "openapi-token-0123456789"
FUZZ_EXAMPLES = 25
IGNORED_METHODS = {"HEAD", "OPTIONS"}


def test_document_is_valid_openapi_3_1(make_settings: MakeSettings) -> None:
    for settings in (make_settings(), make_settings(publish_tokens=[TOKEN])):
        document = build_document(settings)
        assert document["openapi"].startswith("3.1")
        validate(document)


def test_every_reference_resolves(make_settings: MakeSettings) -> None:
    document = build_document(make_settings(publish_tokens=[TOKEN]))
    references = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(document))
    assert references
    for reference in references:
        node: Any = document
        for part in reference.split("/"):
            assert part in node, f"#/{reference} does not resolve"
            node = node[part]


async def test_document_names_exactly_the_routes_the_app_serves(
    start_client: StartClient, make_settings: MakeSettings
) -> None:
    client = await start_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters" and method.upper() not in IGNORED_METHODS
    }
    routes = [
        (route.resource.get_info(), route.method)
        for route in client.app.router.routes()
        if route.method not in IGNORED_METHODS and route.resource is not None
    ]

    def serves(info: Mapping[str, Any], method: str, path: str, documented_method: str) -> bool:
        if method != documented_method:
            return False
        if "path" in info:
            return bool(info["path"] == path)
        # A templated path is documented as its template; a regex route of fixed names
        # (`/{name:app\.js|style\.css}`) is documented as each name.
        return bool(info["formatter"] == path or info["pattern"].fullmatch(path))

    for path, method in documented:
        assert any(serves(i, m, path, method) for i, m in routes), f"{method} {path} not served"
    for info, method in routes:
        assert any(serves(info, method, p, m) for p, m in documented), f"{info} undocumented"


async def test_docs_page_is_self_contained_and_names_every_operation(
    start_client: StartClient, make_settings: MakeSettings
) -> None:
    client = await start_client(make_settings())
    response = await client.get("/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "<script" not in page
    assert "http://" not in page
    assert "https://" not in page
    for path in build_document(make_settings())["paths"]:
        assert f"<code>{path}</code>" in page


async def test_docs_page_escapes_the_document() -> None:
    document = build_document(build_settings({}))
    hostile = {**document, "info": {**document["info"], "summary": "<img src=x onerror=1>"}}
    page = render_document(hostile)
    assert "<img" not in page
    assert "&lt;img src=x onerror=1&gt;" in page


async def test_docs_page_renders_code_spans_and_keeps_them_escaped() -> None:
    page = render_document(build_document(build_settings({})))
    assert "<code>finish</code>" in page
    prose = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)  # schemas are shown as JSON
    assert "`" not in prose
    document = build_document(build_settings({}))
    hostile = {**document, "info": {**document["info"], "summary": "see `<b>x</b>` & `a`"}}
    assert "<p>see <code>&lt;b&gt;x&lt;/b&gt;</code> &amp; <code>a</code></p>" in (
        render_document(hostile)
    )


def test_document_states_the_id_entropy_the_code_has() -> None:
    operation = build_document(build_settings({}))["paths"]["/sse/getSessionId"]["get"]
    ids = [new_session_id() for _ in range(200)]
    # Each character is an independent choice among distinct symbols: log2 of their number.
    alphabet = set("".join(ids))
    assert alphabet <= set(BASE62)
    assert len(set(BASE62)) == len(BASE62)
    assert len(alphabet) > len(BASE62) * 0.9  # all of it in use, not a subset
    bits = len(ids[0]) * math.log2(len(BASE62))
    assert f"{round(bits)} random bits" in operation["description"]
    assert f"{len(ids[0])} base-{len(BASE62)} characters" in operation["description"]
    pattern = operation["responses"]["200"]["content"]["text/plain"]["schema"]["pattern"]
    assert all(re.fullmatch(pattern, session_id) for session_id in ids)
    assert not re.fullmatch(pattern, ids[0][:-1] + "_")


_NAMES = st.sampled_from(
    ["", "a", "gap", "unauthorized", "finish", "x\n", "x\r", "a b", "x" * 64, "x" * 65, "é",
     "ok.name:1-2", "nul\x00"]
)  # fmt: skip
_VALUES = st.one_of(
    _NAMES, st.none(), st.integers(), st.booleans(), st.lists(st.integers(), max_size=3),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
)  # fmt: skip
_EVENTS = st.one_of(
    st.fixed_dictionaries({"data": _VALUES}, optional={"event": _NAMES}),
    st.fixed_dictionaries({"data": _VALUES, "event": _VALUES}),
    st.fixed_dictionaries(
        {}, optional={"data": _VALUES, "event": _NAMES, "id": _VALUES, "extra": _VALUES}
    ),
)
_BODIES = st.one_of(
    _EVENTS, _VALUES, st.lists(st.one_of(_EVENTS, _EVENTS, _VALUES), max_size=4),
    st.lists(st.just({"data": 1}), min_size=MAX_BATCH_EVENTS, max_size=MAX_BATCH_EVENTS + 1),
)  # fmt: skip
_DOCUMENT = build_document(build_settings({}))
_BODY_SCHEMA = _DOCUMENT["paths"]["/sse/sessions/{sessionId}/events"]["post"]["requestBody"]
_BODY_VALIDATOR = jsonschema_rs.validator_for(
    {**_BODY_SCHEMA["content"]["application/json"]["schema"],
     "components": _DOCUMENT["components"]}
)  # fmt: skip


@examples(max_examples=500, deadline=None)
@given(_BODIES)
@example({"data": 1})
@example({"event": "gap", "data": 1})
@example({"event": "x\n", "data": 1})
@example({"event": "x" * 65, "data": 1})
@example({"event": "", "data": 1})
@example({"event": None, "data": 1})
@example({"data": 1, "id": "1-1"})
@example({"data": 1, "extra": 1})
@example({"event": "a"})
@example([])
@example([{"data": 1}] * (MAX_BATCH_EVENTS + 1))
@example([{"data": 1}, "x"])
def test_the_documented_body_schema_accepts_exactly_what_publishing_accepts(body: Any) -> None:
    # An ECMA-262 validator, as OpenAPI's patterns are: its `$` is the end of the text only.
    try:
        parse_body(json.dumps(body).encode(), max_event_bytes=1 << 20)
    except ServiceError:
        accepted = False
    else:
        accepted = True
    assert _BODY_VALIDATOR.is_valid(body) == accepted


async def test_streams_carry_the_request_id_the_document_promises(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: Any
) -> None:
    document = build_document(make_settings())
    stream_ok = document["paths"]["/sse/connect"]["get"]["responses"]["200"]
    assert "X-Request-Id" in stream_ok["headers"]
    assert "streams carry it too" in document["info"]["description"]
    client = await start_client(make_settings(demo_runs=False, session_ttl_s=0.2), fake_opener)
    response = await client.get(
        "/sse/connect", params={"sessionId": "abc"}, headers={"X-Request-Id": "trace-42"}
    )
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "trace-42"
    await response.read()


class LiveServer:
    """An app on a free loopback port, served from its own thread and event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(create_app(self._settings), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    settings = build_settings(
        {
            "publish_tokens": [TOKEN],
            "session_ttl_s": 0.1,
            "heartbeat_interval_s": 0.1,
            "producer_interval_ms": 10,
            "producer_poll_ms": 100,
            "drain_timeout_s": 1.0,
        }
    )
    server = LiveServer(settings)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(live_server: LiveServer) -> Any:
    config = schemathesis.Config()
    project = config.projects.get_default()
    project.update(base_url=live_server.url, request_timeout=10)
    # Derandomized: the same examples every run; nothing stored between runs.
    project.generation.update(max_examples=FUZZ_EXAMPLES, deterministic=True, database="none")
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.timeout(180)
@schema.parametrize()
def test_api_conforms_to_its_document(case: Any) -> None:
    # schemathesis 4.x's coverage phase builds its "positive" template with `Last-Event-ID: 0`,
    # ignoring the header's pattern, so acceptance of "valid" data is judged in the other phases.
    # The documented HEAD operations exist to state their refusal: 405 is their only answer.
    refused = case.method == "HEAD" or case.meta.phase.name is TestPhase.COVERAGE
    excluded = [positive_data_acceptance] if refused else []
    headers = case.headers or {}
    if "Idempotency-Key" in headers and case.meta.generation.mode.is_positive:
        # A key names one request: generated keys repeat across examples with other bodies,
        # which the API rightly refuses (422).
        headers["Idempotency-Key"] = uuid.uuid4().hex
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=excluded)


def test_document_describes_the_token_security_schemes(make_settings: MakeSettings) -> None:
    open_mode = build_document(make_settings())
    token_mode = build_document(
        make_settings(subscribe_auth="token", token_hs256_secrets=["k:" + "s" * 32],
                      token_cookie="app_sse", redis_url="redis://127.0.0.1:1/0")
    )  # fmt: skip
    for document in (open_mode, token_mode):
        validate(document)
    schemes = token_mode["components"]["securitySchemes"]
    assert schemes["subscriberBearer"] == {
        **schemes["subscriberBearer"],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert (schemes["subscriberQuery"]["in"], schemes["subscriberQuery"]["name"]) == (
        "query",
        "access_token",
    )
    assert (schemes["subscriberCookie"]["in"], schemes["subscriberCookie"]["name"]) == (
        "cookie",
        "app_sse",
    )
    connect = token_mode["paths"]["/sse/connect"]["get"]
    assert connect["security"] == [
        {"subscriberBearer": []},
        {"subscriberQuery": []},
        {"subscriberCookie": []},
    ]
    assert {"401", "403", "204"} <= set(connect["responses"])
    assert "Accept: text/event-stream" in connect["responses"]["204"]["description"]
    # Open mode asks nothing of subscribers, and says no more than it does.
    open_connect = open_mode["paths"]["/sse/connect"]["get"]
    assert "security" not in open_connect
    assert "401" not in open_connect["responses"]
    # The demo mint exists only in the embedded mode, and so does its description.
    assert "/dev/token" in open_mode["paths"]
    assert "/dev/token" not in token_mode["paths"]
    publish = token_mode["paths"]["/sse/sessions/{sessionId}/events"]["post"]
    assert publish["security"] == [{"bearerAuth": []}]
    assert "insufficient_scope" in publish["responses"]["403"]["description"]
