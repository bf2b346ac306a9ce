"""One SSE connection: headers, replay from the log, live events, heartbeats, and its end.

The connection's subscription is live before its session is attached and its log is read,
so the seam between replay and live delivery has neither gap nor duplicate: live events
are dropped when their id is not newer than the last one written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum

from aiohttp import web

from . import sse
from .envelope import Delivery, parse_event_id
from .hub import EndReason, Incoming, Listener, Resync
from .sessions import SessionStore

log = logging.getLogger(__name__)

GAP_EVENT = "gap"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}


class StreamEnd(Enum):
    """Why a stream ended, as logged and counted."""

    FINISHED = "finished"
    EXPIRED = "expired"
    CLIENT_GONE = "client_gone"
    SLOW = "slow"
    SHUTDOWN = "shutdown"
    HUB_FAILED = "hub_failed"


_END_BY_HUB = {
    EndReason.SLOW: StreamEnd.SLOW,
    EndReason.SHUTDOWN: StreamEnd.SHUTDOWN,
    EndReason.HUB_FAILED: StreamEnd.HUB_FAILED,
}


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What one connection will do, decided before its response starts."""

    session_id: str
    replay_after: str
    detect_gap: bool
    ttl_ms: int
    retry_ms: int
    heartbeat_interval_s: float


class EventStream:
    """Writes one session's events to one client until the stream has a reason to end."""

    def __init__(
        self,
        response: web.StreamResponse,
        listener: Listener,
        sessions: SessionStore,
        plan: StreamPlan,
    ) -> None:
        self._response = response
        self._listener = listener
        self._sessions = sessions
        self._plan = plan
        self._last_id = plan.replay_after
        self._last_position = parse_event_id(plan.replay_after)
        self.events_sent = 0

    async def run(self) -> StreamEnd:
        """Replay what the client missed, then relay live events; return why it ended."""
        plan = self._plan
        expires_at = time.monotonic() + plan.ttl_ms / 1000
        await self._response.write(sse.retry(plan.retry_ms) + sse.comment("connected"))
        if await self._replay(plan.replay_after, plan.detect_gap):
            return StreamEnd.FINISHED
        while True:
            wait_s = min(plan.heartbeat_interval_s, max(0.0, expires_at - time.monotonic()))
            items = await self._listener.take(wait_s)
            if items:
                if await self._relay(items):
                    return StreamEnd.FINISHED
            elif self._listener.ended is not None:
                return _END_BY_HUB[self._listener.ended]
            elif time.monotonic() >= expires_at:
                ttl_ms = await self._sessions.ttl_ms(plan.session_id)
                if ttl_ms <= 0:
                    return StreamEnd.EXPIRED
                expires_at = time.monotonic() + ttl_ms / 1000
            else:
                await self._response.write(sse.PING)

    async def _relay(self, items: list[Incoming | Resync]) -> bool:
        """Write new events among `items` in one write; True once `finish` went out."""
        frames: list[bytes] = []
        finished = False
        for item in items:
            if isinstance(item, Resync):
                await self._flush(frames)
                frames = []
                if await self._replay(self._last_id, detect_gap=True):
                    return True
                continue
            try:
                delivery = item.delivery
            except ValueError:
                log.error("dropping a malformed message on session %s", self._plan.session_id)
                continue
            if self._accept(delivery):
                frames.append(delivery.frame)
                if delivery.is_finish:
                    finished = True
                    break
        await self._flush(frames)
        return finished

    async def _replay(self, after: str, detect_gap: bool) -> bool:
        """Write logged events after `after`; True if the log ends with `finish`."""
        deliveries, gap = await self._sessions.read_log(
            self._plan.session_id, after, detect_gap=detect_gap
        )
        frames = []
        if gap:
            frames.append(sse.Event(data=after, event=GAP_EVENT).encode())
        for delivery in deliveries:
            if self._accept(delivery):
                frames.append(delivery.frame)
                if delivery.is_finish:
                    await self._flush(frames)
                    return True
        await self._flush(frames)
        return False

    def _accept(self, delivery: Delivery) -> bool:
        if delivery.position <= self._last_position:
            return False
        self._last_position = delivery.position
        self._last_id = delivery.id
        self.events_sent += 1
        return True

    async def _flush(self, frames: list[bytes]) -> None:
        if frames:
            await self._response.write(b"".join(frames))
