"""The demo page in a real headless Chromium, against the service on a real port and real Redis.

The browser is Debian's `chromium` package driven by Playwright (tests/chromium_process.py);
no browser is ever downloaded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from service.token_keys import SigningKey
from service.tokens import mint_token

from app_clients import MakeSettings
from chromium_process import HAVE_PLAYWRIGHT, headless_chromium
from live_service import Service, serve

if HAVE_PLAYWRIGHT:
    from playwright.async_api import Browser, ConsoleMessage, Page, ViewportSize, expect

pytestmark = [pytest.mark.browser, pytest.mark.redis]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
RETRY_MS = 300
WAIT_MS = 10_000
PHONE: ViewportSize = {"width": 360, "height": 800}
EVENT_ID = re.compile(r"^(\d+)-(\d+)$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
READ_EVENTS = """items => items.map(item => ({
    id: item.dataset.id,
    name: item.dataset.name,
    data: item.querySelector(".event-data").textContent,
}))"""


RECORD_STATES = """() => {
    window.statusStates = [];
    const status = document.getElementById("status");
    new MutationObserver(() => window.statusStates.push(status.dataset.state))
        .observe(status, {attributes: true, attributeFilter: ["data-state"]});
}"""


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for one test."""
    async with headless_chromium() as launched:
        yield launched


@pytest.fixture
def start_service(aiohttp_server: Any, make_settings: MakeSettings, redis_url: str) -> StartService:
    """Serve the production app on a real loopback port, recording what it answers."""

    async def start(**overrides: Any) -> Service:
        settings = make_settings(
            **{
                "redis_url": redis_url,
                "retry_ms": RETRY_MS,
                "producer_interval_ms": 50,
                **overrides,
            }
        )
        return await serve(aiohttp_server, settings)

    return start


@pytest.fixture
def page_errors() -> list[str]:
    """Script errors and console errors of every page a test watches; checked by the test."""
    return []


def watch(page: Page, errors: list[str]) -> list[str]:
    """Collect `page`'s script and console errors into `errors`; return its request URLs."""
    requested: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"console: {message.text}")

    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("console", on_console)
    return requested


async def finished_events(page: Page) -> list[dict[str, str]]:
    """Wait until the page reports "finished", then read its event list."""
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "finished", timeout=WAIT_MS
    )
    await expect(page.locator("#status")).to_contain_text("finished")
    events: list[dict[str, str]] = await page.locator("#events li").evaluate_all(READ_EVENTS)
    return events


def check_demo_run(events: list[dict[str, str]], session_id: str) -> None:
    """Ten events in order: nine unnamed ticks, then `finish`, all naming the session."""
    assert [e["name"] for e in events] == ["message"] * 9 + ["finish"]
    positions = []
    for event in events:
        match = EVENT_ID.match(event["id"])
        assert match, event
        positions.append((int(match[1]), int(match[2])))
    assert positions == sorted(set(positions)), "ids must strictly increase"
    clock = r"server time: \d\d:\d\d:\d\d\.\d{6}"
    for event in events[:-1]:
        assert re.fullmatch(rf"{clock} id: {session_id}", event["data"]), event
    assert re.fullmatch(rf"{clock} 结束: {session_id}", events[-1]["data"]), events[-1]


async def start_session(page: Page) -> str:
    """Press the button; return the session id the page shows."""
    await page.get_by_role("button", name="Get a session id and connect").click()
    output = page.locator("#session-id")
    await expect(output).to_have_text(re.compile(r"^[A-Za-z0-9_-]{1,64}$"), timeout=WAIT_MS)
    return await output.inner_text()


def connect_urls(requested: list[str]) -> list[str]:
    return [url for url in requested if "/sse/connect" in url]


async def test_page_shows_the_run_in_order_and_closes_on_finish(
    browser: Browser, start_service: StartService, page_errors: list[str], tmp_path: Path
) -> None:
    service = await start_service()
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    requested = watch(page, page_errors)
    await page.goto(service.url)
    await expect(page.locator("#status")).to_have_text("idle")

    session_id = await start_session(page)
    events = await finished_events(page)

    check_demo_run(events, session_id)
    await expect(page.locator("#event-count")).to_have_text("(10)")
    await expect(page.locator("#status")).to_have_text(
        "finished: 10 events received, connection closed"
    )
    # A browser whose source stayed open would reconnect one retry period after the server
    # ended the response (and get 204). Absence can only be watched over a window: three periods.
    await asyncio.sleep(3 * RETRY_MS / 1000)
    assert len(connect_urls(requested)) == 1, requested
    assert [(s.session_id, s.last_event_id, s.status) for s in service.connects()] == [
        (session_id, None, 200)
    ]
    # Readable at 360 px: nothing sticks out sideways.
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    shot = tmp_path / "finished.png"
    await page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    assert shot.stat().st_size > 10_000
    assert page_errors == []
    await context.close()


async def test_second_viewer_gets_every_event_of_the_same_session(
    browser: Browser, start_service: StartService, page_errors: list[str]
) -> None:
    service = await start_service(producer_interval_ms=150)
    context = await browser.new_context(viewport=PHONE)
    first = await context.new_page()
    watch(first, page_errors)
    await first.goto(service.url)
    session_id = await start_session(first)

    link = first.get_by_role("link", name="Open a second viewer of this session")
    async with context.expect_page(timeout=WAIT_MS) as opened:
        await link.click()
    second = await opened.value
    watch(second, page_errors)
    assert f"session={session_id}" in second.url

    first_events, second_events = await asyncio.gather(
        finished_events(first), finished_events(second)
    )
    check_demo_run(first_events, session_id)
    assert second_events == first_events
    await expect(second.locator("#session-id")).to_have_text(session_id)
    assert [(s.session_id, s.last_event_id) for s in service.connects()] == [
        (session_id, None),
        (session_id, None),
    ]
    assert page_errors == []
    await context.close()


async def test_page_resumes_after_a_dropped_connection(
    browser: Browser, start_service: StartService, page_errors: list[str]
) -> None:
    service = await start_service(producer_interval_ms=100)
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    watch(page, page_errors)
    await page.goto(service.url)
    await page.evaluate(RECORD_STATES)
    session_id = await start_session(page)
    await page.wait_for_function(
        "document.querySelectorAll('#events li').length >= 3", timeout=WAIT_MS
    )

    transport = service.streams[0].transport
    assert transport is not None
    transport.close()  # the network drops the stream mid-run
    events = await finished_events(page)

    check_demo_run(events, session_id)
    assert await page.evaluate("window.statusStates") == [
        "requesting",
        "connecting",
        "open",
        "reconnecting",
        "open",
        "finished",
    ]
    first, resumed = service.connects()
    assert first.last_event_id is None
    assert resumed.last_event_id in [e["id"] for e in events[2:-1]]
    # The browser's own console reports the dropped stream; nothing else may go wrong.
    assert page_errors == ["console: Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING"]
    await context.close()


@pytest.fixture
async def page_server(aiohttp_server: Any) -> str:
    """A plain static server for web/ on its own port: a different origin from the service."""
    app = web.Application()
    app.router.add_static("/demo/", WEB_DIR)
    server = await aiohttp_server(app)
    return str(server.make_url("/demo/index.html"))


async def test_page_from_another_origin_uses_the_configured_server(
    browser: Browser, start_service: StartService, page_server: str, page_errors: list[str]
) -> None:
    service = await start_service()
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    watch(page, page_errors)
    await page.goto(f"{page_server}?server={service.url}")
    await expect(page.get_by_label("Server URL")).to_have_value(service.url)

    session_id = await start_session(page)
    events = await finished_events(page)
    check_demo_run(events, session_id)
    viewer_link = await page.locator("#second-viewer").get_attribute("href")
    assert viewer_link is not None
    assert viewer_link.startswith(page_server)
    assert f"session={session_id}" in viewer_link
    assert "server=" in viewer_link

    # What a cross-origin EventSource sends when it resumes: `Last-Event-ID` needs a CORS
    # preflight, and a client already past `finish` must be told to stop (204).
    status = await page.evaluate(
        """async ([url, lastId]) =>
            (await fetch(url, {headers: {"Last-Event-ID": lastId}})).status""",
        [f"{service.url}sse/connect?sessionId={session_id}", events[-1]["id"]],
    )
    assert status == 204
    assert [s.status for s in service.connects("OPTIONS")] == [200]
    assert service.connects()[-1].last_event_id == events[-1]["id"]
    assert page_errors == []
    await context.close()


# --- Signed subscriber tokens in the browser ---

TOKEN_SETTINGS: dict[str, Any] = {
    # The demo token endpoint exists only in the embedded single-process mode.
    "redis_url": "",
    "subscribe_auth": "token",
    "token_leeway_s": 0,
}


async def test_token_mode_renews_an_expired_token_and_loses_nothing(
    browser: Browser, start_service: StartService, page_errors: list[str]
) -> None:
    service = await start_service(**TOKEN_SETTINGS, producer_interval_ms=400)
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    requested = watch(page, page_errors)
    await page.goto(f"{service.url}?token=1&ttl=1")
    await page.evaluate(RECORD_STATES)
    session_id = await start_session(page)
    events = await finished_events(page)

    check_demo_run(events, session_id)
    states = await page.evaluate("window.statusStates")
    renewals = len(connect_urls(requested)) - 1
    assert renewals >= 1
    assert states == ["requesting"] + ["authorizing", "connecting", "open"] * (renewals + 1) + [
        "finished"
    ]
    await expect(page.locator("#token-state")).to_contain_text("renewed")

    urls = connect_urls(requested)
    assert len(urls) >= 2
    queries = [parse_qs(urlsplit(url).query) for url in urls]
    tokens = [q["access_token"][0] for q in queries]
    assert len(set(tokens)) == len(tokens), "each connect carries a fresh token"
    assert "lastEventId" not in queries[0]
    ids = [e["id"] for e in events]
    for query in queries[1:]:
        assert query["lastEventId"][0] in ids
    statuses = [s.status for s in service.connects()]
    assert statuses == [200] * len(urls), "the page renews before EventSource could retry"
    assert page_errors == []
    await context.close()


async def test_an_eventsource_stops_on_expiry_when_the_page_does_nothing(
    browser: Browser, start_service: StartService, page_errors: list[str]
) -> None:
    """The stream ends with `unauthorized`; EventSource's own reconnect is answered 204."""
    service = await start_service(**TOKEN_SETTINGS, demo_runs=False)
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    watch(page, page_errors)
    await page.goto(service.url)
    minted = await page.evaluate(
        """async () => (await fetch("dev/token?sessionId=plain&ttlS=1",
                                    {method: "POST"})).json()"""
    )
    await page.evaluate(
        """token => {
            window.seen = [];
            const es = new EventSource("sse/connect?sessionId=plain&access_token=" + token);
            window.es = es;
            es.addEventListener("unauthorized", () => window.seen.push("unauthorized"));
            es.onerror = () => window.seen.push("error:" + es.readyState);
        }""",
        minted["token"],
    )
    await page.wait_for_function(
        "window.seen.includes('error:' + EventSource.CLOSED)", timeout=WAIT_MS
    )
    assert await page.evaluate("window.seen") == ["unauthorized", "error:0", "error:2"]
    assert [s.status for s in service.connects()] == [200, 204]
    # Closed for good: no further attempt within three retry periods.
    await asyncio.sleep(3 * RETRY_MS / 1000)
    assert len(service.connects()) == 2
    assert page_errors == []


CREDENTIALED_STREAM = """url => new Promise(resolve => {
    const received = [];
    const source = new EventSource(url, {withCredentials: true});
    const end = failed => { source.close(); resolve({received, failed}); };
    source.onmessage = event => received.push(["message", event.data]);
    source.addEventListener("finish", event => {
        received.push(["finish", event.data]);
        end(false);
    });
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) end(true); };
})"""


@pytest.mark.parametrize("allow_credentials", [True, False], ids=["allowed", "not-allowed"])
async def test_a_credentialed_event_source_from_another_origin(
    browser: Browser,
    start_service: StartService,
    page_server: str,
    page_errors: list[str],
    allow_credentials: bool,
) -> None:
    # `withCredentials` makes Chromium require the exact origin and Allow-Credentials.
    page_origin = "/".join(page_server.split("/")[:3])
    service = await start_service(cors_origins=[page_origin], cors_credentials=allow_credentials)
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    watch(page, page_errors)
    await page.goto(page_server)
    outcome = await page.evaluate(
        CREDENTIALED_STREAM, f"{service.url}sse/connect?sessionId=credentialed"
    )
    if allow_credentials:
        assert outcome["failed"] is False
        assert [name for name, _ in outcome["received"]] == ["message"] * 9 + ["finish"]
        assert all("credentialed" in data for _, data in outcome["received"])
        assert page_errors == []
    else:
        # What the browser did before credentials could be allowed: the stream is refused.
        assert outcome == {"received": [], "failed": True}
        assert any("Access-Control-Allow-Credentials" in e for e in page_errors), page_errors
    await context.close()


COOKIE_STREAM = """([url, withCredentials]) => new Promise(resolve => {
    const seen = [];
    const source = new EventSource(url, {withCredentials});
    source.onmessage = event => seen.push(["message", event.data]);
    for (const name of ["finish", "unauthorized"]) {
        source.addEventListener(name, event => {
            seen.push([name, event.data]);
            if (name === "finish") { source.close(); resolve(seen); }
        });
    }
    source.onerror = () => {
        seen.push(["error", source.readyState]);
        if (source.readyState === EventSource.CLOSED) resolve(seen);
    };
})"""


async def test_a_token_cookie_authorizes_a_credentialed_event_source_from_another_origin(
    browser: Browser, start_service: StartService, page_server: str, page_errors: list[str]
) -> None:
    """The cookie path end to end: set by the application (here: the test) for the service's
    host, sent by EventSource only with `withCredentials`, allowed by credentialed CORS;
    when the token runs out, the stream ends and the browser's own reconnect gets 204."""
    page_origin = "/".join(page_server.split("/")[:3])
    secret = "browser-cookie-secret-0123456789ab"
    service = await start_service(
        subscribe_auth="token", token_hs256_secrets=[f"web:{secret}"], token_leeway_s=0,
        cors_origins=[page_origin], cors_credentials=True, token_cookie="app_sse",
        producer_interval_ms=50,
    )  # fmt: skip
    key = SigningKey("web", "HS256", secret.encode())
    context = await browser.new_context(viewport=PHONE)
    # The page and the service share a host (a site) on two ports (two origins): a cookie
    # for the host goes to both, like a cookie an application sets for its API's domain.
    await context.add_cookies([
        {"name": "app_sse", "value": mint_token(key, subscribe=["c-*"], ttl_s=60),
         "url": service.url},
    ])  # fmt: skip
    page = await context.new_page()
    watch(page, page_errors)
    await page.goto(page_server)

    def stream(base: str, session_id: str, credentials: bool = True) -> Any:
        return page.evaluate(
            COOKIE_STREAM, [f"{base}sse/connect?sessionId={session_id}", credentials]
        )

    seen = await stream(service.url, "c-1")
    assert [name for name, _ in seen] == ["message"] * 9 + ["finish"]
    # Without withCredentials the browser sends no cookie: no token, 401, the source closes.
    assert await stream(service.url, "c-2", credentials=False) == [["error", 2]]
    # A token for other sessions is 403.
    assert await stream(service.url, "d-1") == [["error", 2]]
    assert [s.status for s in service.connects()] == [200, 401, 403]

    # A token that runs out mid-stream: `unauthorized`, then the reconnect (same cookie) is 204.
    quiet = await start_service(
        subscribe_auth="token", token_hs256_secrets=[f"web:{secret}"], token_leeway_s=0,
        cors_origins=[page_origin], cors_credentials=True, token_cookie="app_sse",
        demo_runs=False,
    )  # fmt: skip
    await context.add_cookies([
        {"name": "app_sse", "value": mint_token(key, subscribe=["c-*"], ttl_s=1),
         "url": quiet.url},
    ])  # fmt: skip
    ended = await stream(quiet.url, "c-3")
    assert [name for name, _ in ended] == ["unauthorized", "error", "error"]
    assert [state for name, state in ended if name == "error"] == [0, 2]
    assert [s.status for s in quiet.connects()] == [200, 204]
    # The browser reports the refusals of the second and third stream; nothing else went wrong.
    assert [e for e in page_errors if "401" not in e and "403" not in e] == []
    await context.close()
