"""The production app served on a real loopback port, with a record of every answer it gave.

For tests whose client is not aiohttp's test client: a browser, a Node process, another
HTTP library, a raw socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from service.app import create_app
from service.settings import Settings


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the service answered, as its server saw it."""

    method: str
    path: str
    session_id: str | None
    last_event_id: str | None
    status: int


@dataclass
class Service:
    """The service under test: its app, its base URL and every request it answered."""

    app: web.Application
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    streams: list[web.Request] = field(default_factory=list)

    def connects(self, method: str = "GET") -> list[Seen]:
        return [s for s in self.seen if s.path == "/sse/connect" and s.method == method]


async def serve(aiohttp_server: Any, settings: Settings) -> Service:
    """Start the app `create_app(settings)` builds on a free port, recording what it answers.

    `aiohttp_server` runs it with `handler_cancellation=True`, as `python -m service` does.
    """
    service = Service(create_app(settings))

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/sse/connect" and response.status == 200:
            service.streams.append(request)
        service.seen.append(
            Seen(
                request.method,
                request.path,
                request.query.get("sessionId"),
                request.headers.get("Last-Event-ID"),
                response.status,
            )
        )

    service.app.on_response_prepare.append(record)
    server = await aiohttp_server(service.app)
    service.url = str(server.make_url("/"))
    return service
