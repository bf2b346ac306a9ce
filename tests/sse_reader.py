"""A small EventSource-style parser for reading streams in tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

STREAM_OPENED = b": connected\n"
"""The last line of a stream's opening (`retry:`, then this comment): after it, it is live."""


@dataclass
class ReceivedEvent:
    """An event as a browser would dispatch it."""

    data: str
    event: str = "message"
    id: str = ""


@dataclass
class SSEParser:
    """Feeds lines, yields events; follows the EventSource parsing rules we rely on."""

    comments: list[str] = field(default_factory=list)
    retry_ms: int | None = None
    last_event_id: str = ""
    _data: list[str] = field(default_factory=list)
    _event: str = ""

    def feed_line(self, line: str) -> ReceivedEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def feed(self, text: str) -> list[ReceivedEvent]:
        """Parse complete text (tests of the parser itself and of encoded frames)."""
        events = []
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line in lines:
            event = self.feed_line(line)
            if event is not None:
                events.append(event)
        return events

    def _dispatch(self) -> ReceivedEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ReceivedEvent(data="\n".join(data), event=event or "message", id=self.last_event_id)


async def read_events(
    response: aiohttp.ClientResponse, parser: SSEParser | None = None
) -> AsyncIterator[ReceivedEvent]:
    """Events from a streaming response until the server closes it."""
    parser = parser or SSEParser()
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            event = parser.feed_line(raw.decode().removesuffix("\r"))
            if event is not None:
                yield event


async def collect(
    response: aiohttp.ClientResponse,
    *,
    until: int | None = None,
    timeout_s: float = 15.0,
    parser: SSEParser | None = None,
) -> list[ReceivedEvent]:
    """Read events until the stream ends, `until` events arrived, or the deadline passes."""
    events: list[ReceivedEvent] = []
    async with asyncio.timeout(timeout_s):
        async for event in read_events(response, parser):
            events.append(event)
            if until is not None and len(events) >= until:
                break
    return events
