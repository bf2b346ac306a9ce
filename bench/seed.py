"""The seed's flow: getSessionId, connect, ten demo events, `finish`, hang up; many at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .progress import Progress
from .sse_client import SSEStream, fetch, open_stream
from .stack import Worker
from .tally import id_position, percentile_ms

DEMO_EVENTS = 10
SESSION_TIMEOUT_S = 60.0


class _Session:
    """One client's view of its demo run: ids in order, the tenth event named `finish`."""

    def __init__(self) -> None:
        self.ids: list[tuple[int, int]] = []
        self.finished = False

    def sink(self, stream: SSEStream, event_id: bytes, event: bytes, data: bytes) -> None:
        del stream, data
        self.ids.append(id_position(event_id))
        if event == b"finish":
            self.finished = True

    @property
    def complete(self) -> bool:
        return self.finished and len(self.ids) == DEMO_EVENTS

    @property
    def in_order(self) -> bool:
        return all(a < b for a, b in zip(self.ids, self.ids[1:], strict=False))


async def run_seed(
    sessions: int, concurrency: int, worker: Worker, progress: Progress
) -> dict[str, Any]:
    """Run `sessions` demo flows, `concurrency` clients at a time."""
    gate = asyncio.Semaphore(concurrency)
    durations_ns: list[int] = []
    outcomes: list[_Session] = []
    failures: list[str] = []

    async def client(advance: Any) -> None:
        async with gate:
            started = time.monotonic_ns()
            session = _Session()
            try:
                async with asyncio.timeout(SESSION_TIMEOUT_S):
                    reply = await fetch(worker.port, "/sse/getSessionId")
                    session_id = reply.body.decode().strip()
                    stream = await open_stream(
                        worker.port, f"/sse/connect?sessionId={session_id}", session.sink
                    )
                    await stream.closed
            except (OSError, TimeoutError, ValueError) as error:
                failures.append(f"{type(error).__name__}: {error}")
            outcomes.append(session)
            durations_ns.append(time.monotonic_ns() - started)
            advance(1)

    cpu_before = worker.cpu_s()
    started = time.monotonic()
    with progress.step(f"{worker.target} seed flow x{sessions}", sessions) as bar:
        await asyncio.gather(*(client(bar.advance) for _ in range(sessions)))
    elapsed_s = time.monotonic() - started
    worker_cpu = worker.cpu_s() - cpu_before
    durations_ns.sort()
    complete = sum(1 for s in outcomes if s.complete)
    result: dict[str, Any] = {
        "scenario": "seed",
        "target": worker.target,
        "sessions": sessions,
        "concurrency": concurrency,
        "complete": complete,
        "out_of_order": sum(1 for s in outcomes if not s.in_order),
        "sessions_per_s": round(complete / elapsed_s, 1),
        "session_p50_ms": round(percentile_ms(durations_ns, 0.5), 1),
        "session_p99_ms": round(percentile_ms(durations_ns, 0.99), 1),
        "worker_cpu_ms_per_session": round(worker_cpu * 1000 / max(1, complete), 3),
    }
    if failures:
        result["failure"] = failures[0]
    return result
