"""Popular SSE clients against a real worker: exactly the events each hands its application.

Chromium's native EventSource, the npm packages `eventsource` and
`@microsoft/fetch-event-source` in Node (pinned in tests/clients/package.json; `.ci/run`
installs them) and `httpx-sse` in Python go through the demo run, a stream cut mid-run and
resumed, and the 204 that stops a client after `finish`. Heartbeats come several times
between events, so every `: ping` a client would take for a message shows up as one. Each
client must surface the logged events and nothing else: no empty message, no duplicate, ids,
names and data as published.

Their reconnect logic differs; each is held to what it does:
- EventSource (Chromium, npm `eventsource`) reconnects by itself after the `retry:` delay,
  sending `Last-Event-ID`, and a 204 closes it for good.
- fetch-event-source reconnects after errors only (waiting for the `retry:` interval and
  sending `Last-Event-ID`). A stream the server ended resolves the call unless `onclose`
  throws, and its default `onopen` takes a 204 (no event-stream type) for an error and retries
  forever; the driver follows its documented pattern: `onclose` throws to reconnect, `onopen`
  stops on 204.
- httpx-sse has no reconnect logic, and reading a 204 raises SSEError (not an event stream).
  The application here does what one must: reconnect with the last id after the `retry:`
  delay, and stop on 204.
- fetch-event-source and httpx-sse attach the `retry:` value to the next event they hand over
  (the first of each connection); EventSource keeps it to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
import pytest
import redis.asyncio as redis
from httpx_sse import aconnect_sse

from service.envelope import decode_log_entry
from service.resources import publisher_key

from app_clients import MakeSettings
from chromium_process import headless_chromium
from live_service import Service, serve
from redis_process import require_tool
from redis_state import log_entries
from waiting import wait_for

pytestmark = pytest.mark.redis

CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
NODE_DRIVER = CLIENTS_DIR / "drive.mjs"
RETRY_MS = 300
WAIT_S = 20.0
# Several heartbeats between two events of the demo run.
HEARTBEAT_S = 0.02
EVENT_INTERVAL_MS = 80

Record = dict[str, Any]


class Run(Protocol):
    """One client following one stream URL."""

    def records(self) -> Awaitable[list[Record]]:
        """What it reported so far: {"kind": "open" | "event" | "error" | "stopped", ...}."""
        ...

    def stopped_by_itself(self) -> Awaitable[bool]:
        """It gave up or closed, and will never connect again."""
        ...

    async def close(self) -> None: ...


class StartRun(Protocol):
    def __call__(self, url: str, *, close_on_finish: bool) -> Awaitable[Run]: ...


@dataclass(frozen=True)
class Client:
    """How to start one kind of client, and how it names an unnamed event."""

    name: str
    unnamed: str
    reports_retry: bool
    start: StartRun


# Chromium's EventSource, in a page of the service's own origin.

CHROMIUM_SOURCE = """([url, closeOnFinish]) => {
    window.records = [];
    const source = new EventSource(url);
    window.source = source;
    const onEvent = event => {
        window.records.push({kind: "event", type: event.type, data: event.data,
                             id: event.lastEventId});
        if (closeOnFinish && event.type === "finish") {
            source.close();
            window.records.push({kind: "stopped", reason: "closed on finish"});
        }
    };
    for (const name of ["message", "finish", "gap", "note"]) {
        source.addEventListener(name, onEvent);
    }
    source.onopen = () => window.records.push({kind: "open"});
    source.onerror = () => {
        window.records.push({kind: "error", readyState: source.readyState});
        if (source.readyState === EventSource.CLOSED) {
            window.records.push({kind: "stopped", reason: "closed after an error"});
        }
    };
}"""


class ChromiumRun:
    def __init__(self, page: Any) -> None:
        self._page = page

    async def records(self) -> list[Record]:
        records: list[Record] = await self._page.evaluate("window.records")
        return records

    async def stopped_by_itself(self) -> bool:
        state: int = await self._page.evaluate("window.source.readyState")
        return state == 2  # CLOSED: an EventSource never reconnects from there

    async def close(self) -> None:
        await self._page.close()


# Node clients: tests/clients/drive.mjs reports one JSON object per line.


class NodeRun:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._records: list[Record] = []
        self._stderr = b""
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        async for line in self._process.stdout:
            self._records.append(json.loads(line))
        self._stderr = await self._process.stderr.read()

    async def records(self) -> list[Record]:
        return list(self._records)

    async def stopped_by_itself(self) -> bool:
        if self._process.returncode is None or not self._reading.done():
            return False
        assert self._process.returncode == 0, self._stderr.decode()
        return True

    async def close(self) -> None:
        if self._process.returncode is None:
            self._process.terminate()
        async with asyncio.timeout(10):
            await self._process.wait()
            await self._reading


# httpx-sse, with the reconnect an application has to write itself.


class HttpxSseRun:
    def __init__(self, url: str, close_on_finish: bool) -> None:
        self._records: list[Record] = []
        self._task = asyncio.create_task(self._follow(url, close_on_finish))

    async def _follow(self, url: str, close_on_finish: bool) -> None:
        records, last_id, retry_ms = self._records, "", 3000
        async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT_S)) as http:
            while True:
                headers = {"Last-Event-ID": last_id} if last_id else {}
                try:
                    async with aconnect_sse(http, "GET", url, headers=headers) as source:
                        status = source.response.status_code
                        records.append({"kind": "open", "status": status})
                        if status == 204:
                            records.append({"kind": "stopped", "reason": "204"})
                            return
                        async for event in source.aiter_sse():
                            records.append(
                                {
                                    "kind": "event",
                                    "type": event.event,
                                    "data": event.data,
                                    "id": event.id,
                                    "retry": event.retry,
                                }
                            )
                            last_id = event.id
                            retry_ms = event.retry if event.retry is not None else retry_ms
                            if close_on_finish and event.event == "finish":
                                records.append({"kind": "stopped", "reason": "closed on finish"})
                                return
                except httpx.TransportError as error:  # the stream was cut
                    records.append({"kind": "error", "message": str(error)})
                await asyncio.sleep(retry_ms / 1000)  # the reconnect delay the server asked for

    async def records(self) -> list[Record]:
        if self._task.done():
            self._task.result()  # raise what went wrong in the client
        return list(self._records)

    async def stopped_by_itself(self) -> bool:
        if self._task.done():
            self._task.result()
            return True
        return False

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


CLIENT_NAMES = [
    pytest.param("chromium", marks=pytest.mark.browser),
    "eventsource",
    "fetch-event-source",
    "httpx-sse",
]


def require_node_clients() -> str:
    """The node binary, once the pinned clients are installed (see require_tool)."""
    node = require_tool(shutil.which("node"), "node is not installed (apt-get install nodejs)")
    installed = all(
        (CLIENTS_DIR / "node_modules" / package / "package.json").exists()
        for package in ("eventsource", "@microsoft/fetch-event-source")
    )
    require_tool(
        "installed" if installed else None,
        "the Node SSE clients are not installed (npm ci --prefix tests/clients)",
    )
    return node


@pytest.fixture(params=CLIENT_NAMES)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    """One kind of SSE client; every run it starts is closed after the test."""
    runs: list[Run] = []
    name: str = request.param

    async def started(run: Run) -> Run:
        runs.append(run)
        return run

    async with contextlib.AsyncExitStack() as stack:
        if name == "chromium":
            browser = await stack.enter_async_context(headless_chromium())

            async def start_chromium(url: str, *, close_on_finish: bool) -> Run:
                page = await browser.new_page()
                await page.goto(url.split("/sse/", 1)[0] + "/healthz")  # the service's origin
                await page.evaluate(CHROMIUM_SOURCE, [url, close_on_finish])
                return await started(ChromiumRun(page))

            yield Client(name, "message", reports_retry=False, start=start_chromium)
        elif name in ("eventsource", "fetch-event-source"):
            node = require_node_clients()

            async def start_node(url: str, *, close_on_finish: bool) -> Run:
                mode = "close-on-finish" if close_on_finish else "keep-open"
                process = await asyncio.create_subprocess_exec(
                    node,
                    str(NODE_DRIVER),
                    name,
                    url,
                    mode,
                    cwd=CLIENTS_DIR,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                return await started(NodeRun(process))

            fetch_event_source = name == "fetch-event-source"
            yield Client(
                name,
                "" if fetch_event_source else "message",
                reports_retry=fetch_event_source,
                start=start_node,
            )
        else:

            async def start_httpx(url: str, *, close_on_finish: bool) -> Run:
                return await started(HttpxSseRun(url, close_on_finish))

            yield Client(name, "message", reports_retry=True, start=start_httpx)
        for run in runs:
            await run.close()


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
def start_service(aiohttp_server: Any, make_settings: MakeSettings, redis_url: str) -> StartService:
    async def start(**overrides: Any) -> Service:
        settings = make_settings(
            **{
                "redis_url": redis_url,
                "retry_ms": RETRY_MS,
                "heartbeat_interval_s": HEARTBEAT_S,
                "producer_interval_ms": EVENT_INTERVAL_MS,
                **overrides,
            }
        )
        return await serve(aiohttp_server, settings)

    return start


async def new_session(service: Service) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(service.url + "sse/getSessionId") as response,
    ):
        assert response.status == 200
        return await response.text()


def stream_url(service: Service, session_id: str) -> str:
    return f"{service.url}sse/connect?sessionId={session_id}"


async def logged_events(
    redis_client: redis.Redis, session_id: str, client: Client
) -> list[tuple[str, str, str]]:
    """The session's log as (name, data, id), named and line-broken as the client shows it."""
    events = []
    for entry_id, fields in await log_entries(redis_client, session_id):
        delivery = decode_log_entry(entry_id, fields)
        data = delivery.data.replace("\r\n", "\n").replace("\r", "\n")
        events.append((delivery.event or client.unnamed, data, delivery.id))
    return events


def surfaced(records: list[Record]) -> list[tuple[str, str, str]]:
    """Every event the client handed to its application, as (name, data, id)."""
    return [(r["type"], r["data"], r["id"]) for r in records if r["kind"] == "event"]


async def until(run: Run, condition: Callable[[list[Record]], bool]) -> list[Record]:
    """Poll the client's records until `condition` holds; fail after WAIT_S."""
    records: list[Record] = []

    async def holds() -> bool:
        nonlocal records
        records = await run.records()
        return condition(records)

    try:
        await wait_for(holds, timeout_s=WAIT_S, interval_s=0.02)
    except TimeoutError:
        pytest.fail(f"condition not met; the client reported {records}")
    return records


async def until_stopped(run: Run) -> list[Record]:
    await wait_for(run.stopped_by_itself, timeout_s=WAIT_S, interval_s=0.02)
    return await run.records()


def check_retry_reports(client: Client, records: list[Record], connections: int) -> None:
    """Clients that show `retry:` show it on the first event of each connection only."""
    if not client.reports_retry:
        return
    retries = [r["retry"] for r in records if r["kind"] == "event"]
    assert retries.count(RETRY_MS) == connections, retries
    assert set(retries) <= {None, RETRY_MS}, retries
    assert retries[0] == RETRY_MS


def check_demo_run(events: list[tuple[str, str, str]], session_id: str, unnamed: str) -> None:
    assert [name for name, _, _ in events] == [unnamed] * 9 + ["finish"]
    clock = r"server time: \d\d:\d\d:\d\d\.\d{6}"
    for _, data, _ in events[:-1]:
        assert re.fullmatch(rf"{clock} id: {session_id}", data)
    assert re.fullmatch(rf"{clock} 结束: {session_id}", events[-1][1])


async def test_demo_run_arrives_exactly(
    client: Client, start_service: StartService, redis_client: redis.Redis
) -> None:
    service = await start_service()
    session_id = await new_session(service)
    run = await client.start(stream_url(service, session_id), close_on_finish=True)

    records = await until(run, lambda rs: any(r["kind"] == "stopped" for r in rs))

    expected = await logged_events(redis_client, session_id, client)
    check_demo_run(expected, session_id, client.unnamed)
    assert surfaced(records) == expected
    check_retry_reports(client, records, connections=1)
    assert [(s.last_event_id, s.status) for s in service.connects()] == [(None, 200)]


async def test_cut_stream_resumes_with_every_event_once(
    client: Client, start_service: StartService, redis_client: redis.Redis
) -> None:
    service = await start_service(demo_runs=False)
    session_id = await new_session(service)
    publisher = service.app[publisher_key]
    sent = [
        ("", "one"),
        ("note", "two\r\nlines"),
        ("", ""),  # before the cut
        ("", "结束 four"),
        ("", "five"),
        ("note", "six\nseven"),  # while the client is away
        ("", "eight"),
        ("", '{"json": [9]}'),
        ("finish", "done"),  # after it resumed
    ]
    run = await client.start(stream_url(service, session_id), close_on_finish=True)
    await until(run, lambda rs: any(r["kind"] == "open" for r in rs))
    for name, data in sent[:3]:
        await publisher.publish(session_id, name, data)
    before_cut = await until(run, lambda rs: len(surfaced(rs)) == 3)

    transport = service.streams[0].transport
    assert transport is not None
    transport.close()  # the network drops the stream mid-run
    for name, data in sent[3:6]:
        await publisher.publish(session_id, name, data)

    async def resumed() -> bool:
        return len(service.connects()) == 2

    await wait_for(resumed, timeout_s=WAIT_S)
    for name, data in sent[6:]:
        await publisher.publish(session_id, name, data)
    records = await until(run, lambda rs: any(r["kind"] == "stopped" for r in rs))

    expected = await logged_events(redis_client, session_id, client)
    assert [(name, data) for name, data, _ in expected] == [
        (name or client.unnamed, data.replace("\r\n", "\n")) for name, data in sent
    ]
    assert surfaced(records) == expected
    assert surfaced(before_cut) == expected[:3]
    check_retry_reports(client, records, connections=2)
    assert [(s.last_event_id, s.status) for s in service.connects()] == [
        (None, 200),
        (expected[2][2], 200),
    ]


async def test_client_that_stays_open_after_finish_is_stopped_by_204(
    client: Client, start_service: StartService, redis_client: redis.Redis
) -> None:
    service = await start_service()
    session_id = await new_session(service)
    run = await client.start(stream_url(service, session_id), close_on_finish=False)

    records = await until_stopped(run)

    expected = await logged_events(redis_client, session_id, client)
    check_demo_run(expected, session_id, client.unnamed)
    assert surfaced(records) == expected
    check_retry_reports(client, records, connections=1)
    # It came back once, after `finish`, was told 204, and stopped for good.
    assert [(s.last_event_id, s.status) for s in service.connects()] == [
        (None, 200),
        (expected[-1][2], 204),
    ]
