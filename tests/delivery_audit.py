"""Live streams and publishing through a Redis failover, and an account of every event.

Each stream is read the way EventSource reads one: when it ends before `finish`, or a
connect is refused, the reader reconnects after a short delay with `Last-Event-ID`; a 204
ends it for good. Events are published through the worker's own API, so the worker's
commands must follow the new primary as well as its subscription.

The report counts, over all streams: events expected (published and acknowledged), received,
duplicated and out of order; streams told of a gap (`event: gap`); acknowledged events a
stream never received, and how many of those were on a stream never told; and how long after
the fault every stream received again an event published after it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from app_clients import AppClient
from sse_reader import STREAM_OPENED, ReceivedEvent, read_events

RECONNECT_DELAY_S = 0.2
PUBLISH_TIMEOUT_S = 10.0


@dataclass
class StreamLog:
    """What one client received, over all its connections."""

    session_id: str
    events: list[tuple[float, ReceivedEvent]] = field(default_factory=list)
    reconnects: int = 0
    refused: int = 0
    broken: int = 0
    finished: bool = False

    def messages(self) -> list[tuple[float, int]]:
        """(receive time, sequence number) of every plain event, in order of arrival."""
        return [(at, int(e.data)) for at, e in self.events if e.event == "message"]

    @property
    def told_of_gap(self) -> bool:
        return any(e.event == "gap" for _, e in self.events)


@dataclass
class Attempt:
    """One publish: when it started and whether the worker acknowledged it (202)."""

    session_id: str
    seq: int
    event: str
    started_at: float
    acked: bool = False


@dataclass(frozen=True)
class AuditReport:
    """The account of one scenario; `line` is what the test run prints."""

    scenario: str
    streams: int
    expected: int
    received: int
    duplicated: int
    out_of_order: int
    gap_signalled: int
    missing: int
    missing_without_gap: int
    unacknowledged_received: int
    reconnects: int
    broken: int
    unfinished: int
    resumed_after_s: float
    publishing_resumed_after_s: float
    # What went wrong on the first few streams that broke the contract, to debug from.
    problems: tuple[str, ...] = ()

    def line(self) -> str:
        return (
            f"{self.scenario}: {self.streams} streams, events expected={self.expected} "
            f"received={self.received} gap-signalled={self.gap_signalled} "
            f"duplicated={self.duplicated} out-of-order={self.out_of_order} "
            f"missing={self.missing} (without gap: {self.missing_without_gap}) "
            f"unacknowledged-but-delivered={self.unacknowledged_received} "
            f"reconnects={self.reconnects} broken={self.broken}; "
            f"delivery resumed {self.resumed_after_s:.2f}s "
            f"and publishing {self.publishing_resumed_after_s:.2f}s after the fault"
        )

    def assert_no_silence(self) -> None:
        """The contract: nothing twice or out of order, nothing lost untold, every stream ends."""
        why = "\n".join([self.line(), *self.problems])
        assert self.duplicated == 0, why
        assert self.out_of_order == 0, why
        assert self.missing_without_gap == 0, why
        assert self.unfinished == 0, why
        assert self.broken == 0, why  # a stream cut off without an end: the worker failed
        assert self.expected > 0, why
        assert self.received > 0, why


class DeliveryAudit:
    """Streams of `session_ids` on one worker, and publishing to them through its API."""

    def __init__(self, client: AppClient, session_ids: list[str], token: str) -> None:
        self._client = client
        self._auth = {"Authorization": f"Bearer {token}"}
        self.logs = {sid: StreamLog(sid) for sid in session_ids}
        self.attempts: list[Attempt] = []
        self._next_seq = dict.fromkeys(session_ids, 0)
        self._readers: list[asyncio.Task[None]] = []
        self._publishing: asyncio.Task[None] | None = None
        self._stop_publishing = asyncio.Event()
        self.rounds = 0

    async def open(self) -> None:
        """Open every stream; they are live (subscribed) when this returns."""
        for log in self.logs.values():
            response = await self._client.get("/sse/connect", params={"sessionId": log.session_id})
            assert response.status == 200, log.session_id
            await response.content.readuntil(STREAM_OPENED)
            self._readers.append(asyncio.create_task(self._read(log, response)))

    async def _read(self, log: StreamLog, response: aiohttp.ClientResponse | None) -> None:
        last_id = ""
        while True:
            if response is None:
                headers = {"Last-Event-ID": last_id} if last_id else {}
                response = await self._client.get(
                    "/sse/connect", params={"sessionId": log.session_id}, headers=headers
                )
            async with response:
                if response.status == 204:
                    log.finished = True  # told: the session's run is over
                    return
                if response.status == 200:
                    try:
                        async for event in read_events(response):
                            log.events.append((time.monotonic(), event))
                            last_id = event.id or last_id
                            if event.event == "finish":
                                log.finished = True
                                return
                    except aiohttp.ClientError:
                        log.broken += 1  # cut off mid-stream (a worker error): reconnect
                    log.reconnects += 1
                else:
                    log.refused += 1
            response = None
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def publish_round(self) -> None:
        """One event to every session, concurrently; an event's number grows per session."""
        await asyncio.gather(*(self._publish(sid, "") for sid in self.logs))
        self.rounds += 1

    async def _publish(self, session_id: str, event: str) -> Attempt:
        seq = self._next_seq[session_id]
        self._next_seq[session_id] = seq + 1
        attempt = Attempt(session_id, seq, event, time.monotonic())
        self.attempts.append(attempt)
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                body = {"event": event, "data": str(seq)} if event else {"data": str(seq)}
                response = await self._client.post(
                    f"/sse/sessions/{session_id}/events", json=body, headers=self._auth
                )
                response.release()
            # 503 while Redis fails over (the event may or may not have gone out); a 409 to a
            # repeated `finish` means an earlier attempt did go out. Anything else is a bug.
            finished_before = event == "finish" and response.status == 409
            assert response.status in (202, 503) or finished_before, (
                f"publish answered {response.status}"
            )
            attempt.acked = response.status == 202 or finished_before
        except TimeoutError:
            pass
        return attempt

    def start_publishing(self, pause_s: float = 0.02) -> None:
        """Publish rounds in the background until `stop_publishing`."""

        async def loop() -> None:
            while not self._stop_publishing.is_set():
                await self.publish_round()
                await asyncio.sleep(pause_s)

        self._publishing = asyncio.create_task(loop())

    async def stop_publishing(self) -> None:
        self._stop_publishing.set()
        if self._publishing is not None:
            await self._publishing

    async def finish(self, timeout_s: float = 30.0) -> None:
        """Publish `finish` to every session until acknowledged, then wait for every reader."""
        async with asyncio.timeout(timeout_s):
            for session_id in self.logs:
                while not (await self._publish(session_id, "finish")).acked:  # noqa: ASYNC110
                    await asyncio.sleep(RECONNECT_DELAY_S)  # a 503: Redis is failing over
            await asyncio.gather(*self._readers)

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self._publishing is not None:
            self._publishing.cancel()
            await asyncio.gather(self._publishing, return_exceptions=True)

    def received_after(self, fault_at: float) -> bool:
        """Every stream has received an event whose publish started after `fault_at`."""
        started = {(a.session_id, a.seq): a.started_at for a in self.attempts}
        return all(
            any(started.get((log.session_id, seq), 0.0) > fault_at for _, seq in log.messages())
            for log in self.logs.values()
        )

    def report(self, scenario: str, fault_at: float) -> AuditReport:
        """The account of every event; `fault_at` is when the fault was injected."""
        started = {(a.session_id, a.seq): a.started_at for a in self.attempts}
        # `finish` ends the streams and is accounted by `unfinished`, not here.
        acked = {(a.session_id, a.seq) for a in self.attempts if a.acked and not a.event}
        counts = dict.fromkeys(
            ("expected", "received", "duplicated", "out_of_order", "gap_signalled", "missing",
             "missing_without_gap", "unacknowledged_received", "reconnects", "broken",
             "unfinished"), 0,
        )  # fmt: skip
        resumed_s = 0.0
        problems: list[str] = []
        for log in self.logs.values():
            messages = log.messages()
            seqs = [seq for _, seq in messages]
            expected = {seq for sid, seq in acked if sid == log.session_id}
            missing = expected - set(seqs)
            counts["expected"] += len(expected)
            counts["received"] += len(seqs)
            counts["duplicated"] += len(seqs) - len(set(seqs))
            counts["out_of_order"] += sum(b <= a for a, b in itertools.pairwise(seqs))
            counts["gap_signalled"] += log.told_of_gap
            counts["missing"] += len(missing)
            counts["missing_without_gap"] += 0 if log.told_of_gap else len(missing)
            if (
                (missing and not log.told_of_gap)
                or not log.finished
                or log.broken
                or len(seqs) != len(set(seqs))
            ):
                problems.append(self._problem(log, sorted(missing), started, fault_at))
            counts["unacknowledged_received"] += len(set(seqs) - expected)
            counts["reconnects"] += log.reconnects
            counts["broken"] += log.broken
            counts["unfinished"] += not log.finished
            after = [at for at, seq in messages if started.get((log.session_id, seq), 0) > fault_at]
            end = log.events[-1][0] if log.events else fault_at
            resumed_s = max(resumed_s, (after[0] if after else end) - fault_at)
        # Publishing to every session worked again (its shard's new primary answered).
        first_acked = {
            sid: min((a.started_at for a in self.attempts
                      if a.session_id == sid and a.acked and a.started_at > fault_at),
                     default=fault_at)
            for sid in self.logs
        }  # fmt: skip
        return AuditReport(
            scenario=scenario, streams=len(self.logs), **counts, problems=tuple(problems[:5]),
            resumed_after_s=resumed_s,
            publishing_resumed_after_s=max(first_acked.values()) - fault_at,
        )  # fmt: skip

    def _problem(
        self,
        log: StreamLog,
        missing: list[int],
        started: dict[tuple[str, int], float],
        fault_at: float,
    ) -> str:
        """One stream's story around the fault: what it got, missed, and when."""

        def at(seq: int) -> str:
            return f"{seq}@{started.get((log.session_id, seq), fault_at) - fault_at:+.2f}s"

        got = [f"{e.event}:{e.data}@{t - fault_at:+.2f}s" for t, e in log.events]
        return (
            f"{log.session_id}: missing {[at(seq) for seq in missing][:12]} "
            f"finished={log.finished} reconnects={log.reconnects} refused={log.refused} "
            f"broken={log.broken}; "
            f"received around the fault {[g for g in got if '@-0.' in g or '@+' in g][:40]}"
        )

    async def play(
        self,
        readiness: ReadinessLog,
        inject: Callable[[], Awaitable[float]],
        recovered: Callable[[], Awaitable[None]],
    ) -> FaultTimes:
        """Publish, inject the fault, wait for Redis to recover and every stream to receive
        again, publish five more rounds, then finish every session.

        `inject` returns the moment of the fault itself (it may prepare it first).
        """
        self.start_publishing()
        await wait_until_async(lambda: self.rounds >= 5, "publishing is under way", 20)
        readiness.start()
        fault_at = await inject()
        await recovered()
        recovered_at = time.monotonic()
        # Events published once Redis (and the worker) recovered arrive on every stream.
        await wait_until_async(
            lambda: self.received_after(recovered_at), "every stream receives again", 30
        )
        resumed_at = time.monotonic()
        rounds = self.rounds
        await wait_until_async(lambda: self.rounds >= rounds + 5, "five more rounds", 20)
        await self.stop_publishing()
        await readiness.stop()
        await self.finish()
        return FaultTimes(fault_at, recovered_at, resumed_at)

    def received_ids(self, session_id: str) -> list[str]:
        """Ids of the plain events one stream received."""
        return [e.id for _, e in self.logs[session_id].events if e.event == "message"]


@dataclass(frozen=True)
class FaultTimes:
    """When the fault was injected, Redis had recovered, and every stream received again."""

    fault_at: float
    recovered_at: float
    resumed_at: float

    def recovered_line(self, what: str) -> str:
        return f"{what} {self.recovered_at - self.fault_at:.2f}s after the fault"


# Readiness follows delivery at the next canary round, a fraction of a second after a failed one.
READY_AGAIN_S = 5.0


async def is_ready(client: AppClient) -> bool:
    """Whether the worker behind `client` answers /readyz with 200 now."""
    async with client.get("/readyz") as response:
        return response.status == 200


async def wait_until_async(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float
) -> None:
    """Poll `condition` every 20 ms until it holds; fail naming `what` after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = condition()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s}s: {what}") from None


@dataclass
class ReadinessLog:
    """`/readyz` sampled every 50 ms while a fault plays out."""

    client: AppClient
    samples: list[tuple[float, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def sample() -> None:
            while True:
                response = await self.client.get("/readyz")
                self.samples.append((time.monotonic(), response.status))
                response.release()
                await asyncio.sleep(0.05)

        self._task = asyncio.create_task(sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def unready_between(self, start: float, end: float) -> bool:
        return any(status == 503 for at, status in self.samples if start <= at <= end)
