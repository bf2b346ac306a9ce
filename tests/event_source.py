"""Clients that behave like the WHATWG EventSource, one that never reads, and a publisher.

An `EventSourceClient` reconnects after the `retry:` delay with `Last-Event-ID`, and stops
for good on a 204, on any other non-200 status or on a wrong content type, as browsers do;
it also stops on `finish`, as the demo page does. It records every event with the time it
arrived, so a test can count what was lost, repeated or reordered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from service.envelope import FINISH_EVENT, GAP_EVENT

from sse_reader import SSEParser

TOKEN = "chaos-publisher-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The reconnection time an EventSource uses before a stream told it one (browsers: 3-5 s).
DEFAULT_RETRY_S = 0.5


@dataclass(slots=True)
class Received:
    """One dispatched event and when it arrived."""

    id: str
    event: str
    data: str
    at: float


@dataclass
class EventSourceClient:
    """One EventSource on one session, recording everything it is given."""

    base_url: str
    session_id: str
    events: list[Received] = field(default_factory=list)
    last_event_id: str = ""
    retry_s: float = DEFAULT_RETRY_S
    ended: str | None = None
    ended_at: float | None = None
    connects: int = 0
    breaks: int = 0
    resumed_from: str = field(init=False)  # the Last-Event-ID of the first connect, if any

    def __post_init__(self) -> None:
        self.resumed_from = self.last_event_id

    @property
    def gaps(self) -> int:
        return sum(1 for e in self.events if e.event == GAP_EVENT)

    def content(self) -> list[Received]:
        """Events other than `gap`."""
        return [e for e in self.events if e.event != GAP_EVENT]

    def first_after(self, t: float) -> float | None:
        """When the first event (or the end) came after `t`."""
        times = [e.at for e in self.events if e.at > t]
        if self.ended_at is not None and self.ended_at > t:
            times.append(self.ended_at)
        return min(times, default=None)

    async def run(self, http: aiohttp.ClientSession) -> None:
        """Connect, read, reconnect after `retry` until the stream is over for good."""
        while self.ended is None:
            try:
                await self._connect(http)
            except (aiohttp.ClientError, OSError):
                self.breaks += 1
            if self.ended is None:
                await asyncio.sleep(self.retry_s)

    async def _connect(self, http: aiohttp.ClientSession) -> None:
        # As every browser's EventSource does; the service answers such a client a condition
        # that passes (Redis slow, worker full) with a stream that says when to come back.
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        url = f"{self.base_url}/sse/connect"
        params = {"sessionId": self.session_id}
        async with http.get(url, params=params, headers=headers) as response:
            self.connects += 1
            media = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if response.status != 200:
                self._end(str(response.status))
            elif media != "text/event-stream":
                self._end(f"content-type {media}")
            else:
                await self._read(response)

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        # As in Chromium and Firefox, a stream's parser starts from the last id seen, so an
        # event without an id of its own does not clear it.
        parser = SSEParser(last_event_id=self.last_event_id)
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                event = parser.feed_line(raw.decode().removesuffix("\r"))
                if parser.retry_ms is not None:
                    self.retry_s = parser.retry_ms / 1000
                if event is None:
                    continue
                self.last_event_id = event.id
                self.events.append(Received(event.id, event.event, event.data, time.monotonic()))
                if event.event == FINISH_EVENT:
                    self._end("finish")
                    return

    def _end(self, how: str) -> None:
        self.ended = how
        self.ended_at = time.monotonic()


async def run_clients(
    http: aiohttp.ClientSession, clients: Sequence[EventSourceClient]
) -> list[asyncio.Task[None]]:
    """Start every client; the tasks end when their clients do (see `settle`)."""
    return [asyncio.create_task(c.run(http), name=f"client-{c.session_id}") for c in clients]


async def settle(tasks: Sequence[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for the clients to end on their own; cancel those still running after `timeout_s`.

    A client still running then counts as silenced (its `ended` stays None).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class NonReader:
    """A client that sends its request and then never reads a byte."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    async def open(self, url: str, session_id: str, last_event_id: str = "") -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        self._sock = sock
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        request = (
            f"GET /sse/connect?sessionId={session_id} HTTP/1.1\r\nHost: {host}\r\n"
            f"Accept: text/event-stream\r\n{resume}\r\n"
        )
        await loop.sock_sendall(sock, request.encode())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass
class ApiPublisher:
    """Publishes numbered events through the authenticated API, as a careful backend would.

    A request whose outcome it does not know (503, timeout, cut connection) is sent again
    with the same `Idempotency-Key`, until it is accepted or the deadline passes.
    """

    http: aiohttp.ClientSession
    base_url: str
    accepted: dict[str, list[str]] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    request_timeout_s: float = 5.0

    async def publish(
        self, session_id: str, data: str, event: str = "", timeout_s: float = 20.0
    ) -> None:
        body = {"data": data, **({"event": event} if event else {})}
        headers = {**AUTH, "Idempotency-Key": f"{session_id}-{data}"}
        url = f"{self.base_url}/sse/sessions/{session_id}/events"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                async with self.http.post(
                    url,
                    json=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                ) as response:
                    if response.status == 202:
                        self.accepted.setdefault(session_id, []).append(data)
                        return
                    if response.status != 503:
                        raise AssertionError(
                            f"publish refused: {response.status} {await response.text()}"
                        )
                    self.retries["503"] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                self.retries[type(error).__name__] += 1
            await asyncio.sleep(0.1)
        raise AssertionError(f"publish of {data!r} to {session_id} never accepted")

    async def feed(self, session_id: str, count: int, interval_s: float) -> None:
        """Events "0" .. "count-1" at `interval_s`, the last one named `finish`."""
        for k in range(count):
            last = k == count - 1
            await self.publish(session_id, str(k), FINISH_EVENT if last else "")
            if not last:
                await asyncio.sleep(interval_s)
