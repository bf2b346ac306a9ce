"""Browser-like stream clients as a command, for a stack only reachable from inside its network
namespace (tests/container_stack.py runs this file there with nsenter).

    python tests/stream_clients.py wait URL          until URL/healthz answers 200
    python tests/stream_clients.py publish URL TOKEN the session API's answers, as JSON
    python tests/stream_clients.py run URL N         N clients each follow a run to `finish`,
                                                     resuming like EventSource; prints
                                                     "midway" once each holds 3 events, then
                                                     the results as one JSON line

Every loop is bounded by a deadline; the process exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field

import aiohttp

from sse_reader import SSEParser, read_events

DEADLINE_S = 120.0
MIDWAY_EVENTS = 3


@dataclass
class Client:
    """One session followed to `finish` across reconnects, as EventSource would."""

    session_id: str = ""
    ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    data_names_session: bool = True
    connects: int = 0
    refusals: list[int] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.names) and self.names[-1] == "finish"

    async def run(self, http: aiohttp.ClientSession, url: str) -> None:
        self.session_id = await _session_id(http, url)
        while not self.finished:
            # The resume point is the id of the last dispatched event, as in a browser.
            headers = {"Last-Event-ID": self.ids[-1]} if self.ids else {}
            parser = SSEParser()
            try:
                await self._connect(http, url, headers, parser)
            except (aiohttp.ClientError, TimeoutError) as error:
                self.breaks.append(repr(error))
            if not self.finished:
                await asyncio.sleep((parser.retry_ms or 500) / 1000)

    async def _connect(
        self, http: aiohttp.ClientSession, url: str, headers: dict[str, str], parser: SSEParser
    ) -> None:
        params = {"sessionId": self.session_id}
        async with http.get(f"{url}/sse/connect", params=params, headers=headers) as response:
            self.connects += 1
            if response.status != 200:
                self.refusals.append(response.status)
                return
            async for event in read_events(response, parser):
                self.ids.append(event.id)
                self.names.append(event.event)
                self.data_names_session &= self.session_id in event.data
                if event.event == "finish":
                    return


async def _session_id(http: aiohttp.ClientSession, url: str) -> str:
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/sse/getSessionId") as response:
                if response.status == 200:
                    return await response.text()
        await asyncio.sleep(0.2)


def _session() -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=20)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))


async def wait(url: str) -> None:
    async with _session() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)


async def publish(url: str, token: str) -> dict[str, int]:
    """Status codes of the session API without, with a wrong and with the configured token."""
    statuses: dict[str, int] = {}
    async with _session() as http:
        session_id = await _session_id(http, url)
        target = f"{url}/sse/sessions/{session_id}/events"
        body = {"event": "note", "data": "from the container test"}
        for name, headers in (
            ("none", {}),
            ("wrong", {"Authorization": "Bearer " + "x" * 24}),
            ("configured", {"Authorization": f"Bearer {token}"}),
        ):
            async with http.post(target, json=body, headers=headers) as response:
                statuses[name] = response.status
    return statuses


async def run(url: str, count: int) -> list[Client]:
    clients = [Client() for _ in range(count)]
    async with _session() as http:
        runs = [asyncio.create_task(client.run(http, url)) for client in clients]
        try:
            while min(len(client.ids) for client in clients) < MIDWAY_EVENTS:
                if all(run.done() for run in runs):
                    break
                await asyncio.sleep(0.05)
            print("midway", flush=True)
            await asyncio.gather(*runs)
        finally:
            for task in runs:
                task.cancel()
    return clients


async def main(argv: list[str]) -> int:
    async with asyncio.timeout(DEADLINE_S):
        if argv[0] == "wait":
            await wait(argv[1])
        elif argv[0] == "publish":
            print(json.dumps(await publish(argv[1], argv[2])), flush=True)
        elif argv[0] == "run":
            clients = await run(argv[1], int(argv[2]))
            print(json.dumps([asdict(client) for client in clients]), flush=True)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
