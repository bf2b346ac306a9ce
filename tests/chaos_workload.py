"""A workload run while a fault is injected: clients, publishers, readiness probes, counts.

Demo clients follow runs of the demo producer; API clients follow sessions the test feeds
through the authenticated publish API. Meanwhile each worker's `/readyz` is asked five times
a second, so a test can hold readiness to the truth: "not ready" while a worker cannot
deliver, "ready" again once it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp

from service.envelope import parse_event_id

from chaos_harness import (
    EVENTS_PER_RUN,
    ChaosStack,
    Deployment,
    idle_state,
    rss_bytes,
    wait_until,
)
from chaos_report import KEYS, Tally, Truth, log_truth
from event_source import ApiPublisher, EventSourceClient, run_clients, settle
from stack_processes import Worker


@dataclass(frozen=True, slots=True)
class Sample:
    started: float
    answered: float
    status: int  # 0: no answer within the probe's timeout


@dataclass
class ReadinessProbe:
    """Asks a worker's /readyz every `interval_s`, each probe on its own, with a deadline.

    As an orchestrator's probe does, it takes no answer within `timeout_s` (twice the
    workers' Redis command timeout) for "not ready".
    """

    http: aiohttp.ClientSession
    worker: Worker
    interval_s: float = 0.2
    timeout_s: float = 2.0
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _probes: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"readyz-{self.worker.name}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._probes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            probe = asyncio.create_task(self._probe())
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)
            await asyncio.sleep(self.interval_s)

    async def _probe(self) -> None:
        started = time.monotonic()
        status = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.http.get(
                f"{self.worker.url}/readyz", timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as r:
                status = r.status
        self.samples.append(Sample(started, time.monotonic(), status))

    def lies_during(self, start: float, end: float) -> list[Sample]:
        """'Ready' answers given while the worker could not deliver."""
        return [s for s in self.samples if start <= s.answered <= end and s.status == 200]

    def not_ready_during(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.answered <= end and s.status != 200]

    def describe(self, start: float, end: float) -> str:
        """The probes answered between `start` and `end`: sent at (s after start), status, took."""
        return ", ".join(
            f"{s.started - start:+.1f}s:{s.status or 'none'}/{s.answered - s.started:.1f}s"
            for s in self.samples
            if start <= s.answered <= end
        )

    def not_ready_after(self, t: float) -> list[Sample]:
        """Probes sent after `t` that did not answer 'ready'."""
        return [s for s in self.samples if s.started >= t and s.status != 200]


API_EVENTS = 15
API_INTERVAL_S = 0.25
# Python keeps some of what a busy minute allocated; more than this above the idle baseline
# after every stream closed is memory held for streams that are gone.
MEMORY_SLACK_BYTES = 48 * 1024 * 1024
# After a fault heals, a worker must say "ready" again within this long.
READY_AGAIN_S = 5.0


class Loss(Enum):
    """What a fault did to a session's data in Redis."""

    NONE = "kept"
    WHILE_FOLLOWED = "lost while its client followed it"
    AFTER_THE_END = "lost after its client had every event"


def new_session_id() -> str:
    from service.sessions import new_session_id as issue  # noqa: PLC0415

    return issue()


@dataclass
class Workload:
    """Demo clients on the demo workers, API clients (fed by a publisher) on the API worker."""

    stack: ChaosStack
    http: aiohttp.ClientSession
    demo_urls: list[str] = field(default_factory=list)
    api_url: str = ""
    api_events: int = API_EVENTS
    demo: list[EventSourceClient] = field(default_factory=list)
    api: list[EventSourceClient] = field(default_factory=list)
    publisher: ApiPublisher | None = None
    probes: list[ReadinessProbe] = field(default_factory=list)
    rss_before: dict[str, int] = field(default_factory=dict)
    idle: dict[str, tuple[float, float]] = field(default_factory=dict)
    rss_growth: int = 0  # the most any worker grew from idle to idle again
    injected: float = 0.0
    healed: float = 0.0
    outage: tuple[float, float] | None = None
    problems: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _feeders: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def clients(self) -> list[EventSourceClient]:
        return [*self.demo, *self.api]

    async def start(self, demo: int, api: int) -> None:
        """`demo` clients spread over `demo_urls`, `api` clients on `api_url`, all at once."""
        await self.watch(self.stack.worker_processes)
        self.demo = [
            EventSourceClient(self.demo_urls[n % len(self.demo_urls)], new_session_id())
            for n in range(demo)
        ]
        self.api = [EventSourceClient(self.api_url, new_session_id()) for _ in range(api)]
        if api:
            self.publisher = ApiPublisher(self.http, self.api_url)
        self._tasks += await run_clients(self.http, self.clients)
        for client in self.api:
            assert self.publisher is not None
            self._feeders.append(
                asyncio.create_task(
                    self.publisher.feed(client.session_id, self.api_events, API_INTERVAL_S)
                )
            )

    async def watch(self, workers: Iterable[Worker]) -> None:
        """Sample these workers' readiness from now on; note their idle memory and channels."""
        for worker in workers:
            self.rss_before[worker.name] = rss_bytes(worker)
            self.idle[worker.name] = await idle_state(self.http, worker)
            probe = ReadinessProbe(self.http, worker)
            probe.start()
            self.probes.append(probe)

    async def add_clients(self, clients: list[EventSourceClient]) -> None:
        """More demo clients, started now."""
        self.demo += clients
        self._tasks += await run_clients(self.http, clients)

    async def add_api_clients(self) -> None:
        """Start the API clients set up by hand (their events come from the test itself)."""
        self._tasks += await run_clients(self.http, self.api)

    async def midway(self, events: int = 3, timeout_s: float = 30) -> None:
        """Wait until every client holds `events` events (or has ended).

        If they do not in time, that is noted and the test goes on: its row still counts
        what every client got.
        """
        await self.wait_for(
            lambda c: len(c.content()) >= events, timeout_s, f"every client to hold {events} events"
        )

    async def wait_for(
        self, holds: Callable[[EventSourceClient], bool], timeout_s: float, what: str
    ) -> None:
        """Wait until `holds` for every client that has not ended; note it if it never does."""
        try:
            await wait_until(
                lambda: all(holds(c) or c.ended for c in self.clients), timeout_s, what
            )
        except AssertionError as error:
            behind = sum(1 for c in self.clients if not (holds(c) or c.ended))
            self.problems.append(f"{error} ({behind} clients behind)")

    def fault_started(self) -> None:
        self.injected = time.monotonic()

    def fault_ended(self, *, outage_until: float | None = None) -> None:
        """The fault is over. With `outage_until`, no worker could reach Redis before then."""
        self.healed = time.monotonic()
        if outage_until is not None:
            self.outage = (self.injected, outage_until)

    async def settle(self, timeout_s: float) -> None:
        """Let clients and publishers finish; whatever is still running after `timeout_s` is not."""
        feeders = asyncio.gather(*self._feeders, return_exceptions=True)
        await settle(self._tasks, timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                outcomes = await feeders
                self.problems += [f"publisher: {o}" for o in outcomes if isinstance(o, Exception)]
        for feeder in self._feeders:
            feeder.cancel()

    async def account(
        self, deployment: Deployment, lost: Callable[[str], bool] = lambda _: False
    ) -> Tally:
        """Count every client's events against what its session should have delivered."""
        tally = Tally()
        client = deployment.client()
        try:
            for es in self.demo:
                tally.add(es, await self._demo_truth(client, es.session_id, self._loss(es, lost)))
            for es in self.api:
                tally.add(es, await self._api_truth(client, es, self._loss(es, lost)))
        finally:
            await client.aclose()
        return tally

    def _loss(self, client: EventSourceClient, lost: Callable[[str], bool]) -> Loss:
        """Whether Redis lost the session's data, and if so, whether the client still followed it.

        A client done before the fault had everything; Redis has nothing left to compare with.
        """
        if not lost(client.session_id):
            return Loss.NONE
        done_before = client.ended_at is not None and client.ended_at <= self.injected
        return Loss.AFTER_THE_END if done_before else Loss.WHILE_FOLLOWED

    async def _demo_truth(self, client: Any, session_id: str, loss: Loss) -> Truth:
        if loss is not Loss.NONE:
            return Truth(None, EVENTS_PER_RUN, "id", data_lost=loss is Loss.WHILE_FOLLOWED)
        # A fresh connect replays from the session's epoch, where its latest run began. A
        # client sent away before any event (Redis slow) whose run ended meanwhile starts a
        # run of its own when it comes back, as the contract says: it follows that one.
        epoch = await client.hget(KEYS.session(session_id), "epoch")
        truth = await log_truth(client, session_id, after=epoch.decode() if epoch else "0-0")
        truth.logged_twice = max(0, truth.count - EVENTS_PER_RUN)
        truth.count = EVENTS_PER_RUN
        return truth

    async def _api_truth(self, client: Any, es: EventSourceClient, loss: Loss) -> Truth:
        session_id = es.session_id
        accepted = self.publisher.accepted.get(session_id, []) if self.publisher else []
        if loss is not Loss.NONE:
            return Truth(None, len(accepted), "data", data_lost=loss is Loss.WHILE_FOLLOWED)
        entries = await client.xrange(KEYS.log(session_id))
        logged = [fields[b"d"].decode() for _, fields in entries]
        unlogged = len(set(accepted) - set(logged))
        if es.resumed_from:  # a client that came with a Last-Event-ID wants what followed it
            after = parse_event_id(es.resumed_from)
            logged = [
                fields[b"d"].decode()
                for entry_id, fields in entries
                if parse_event_id(entry_id.decode()) > after
            ]
            accepted = logged
        return Truth(
            logged,
            len(accepted),
            "data",
            logged_twice=len(logged) - len(set(logged)),
            unlogged=unlogged,
        )

    def readiness_problems(self, grace_s: float) -> list[str]:
        """`/readyz` must say "not ready" while the workers cannot deliver, "ready" after."""
        problems = []
        silenced = sum(1 for c in self.clients if c.ended is None)
        for probe in self.probes:
            name = probe.worker.name
            if not probe.worker.running:
                continue
            if self.outage is not None:
                start, end = self.outage[0] + grace_s, self.outage[1]
                if end - start >= 0.5:
                    lies = probe.lies_during(start, end)
                    if lies:
                        problems.append(
                            f"{name}: 'ready' {len(lies)}x while Redis was away: "
                            f"{probe.describe(self.outage[0], end + grace_s)}"
                        )
                    if not probe.not_ready_during(start, end + grace_s):
                        problems.append(
                            f"{name}: never said 'not ready' during the outage: "
                            f"{probe.describe(self.outage[0], end + grace_s)}"
                        )
            late = probe.not_ready_after(max(self.healed, self.injected) + READY_AGAIN_S)
            if late:
                problems.append(
                    f"{name}: 'not ready' {len(late)}x after the fault healed "
                    f"(statuses {sorted({s.status for s in late})})"
                )
            last = probe.samples[-1].status if probe.samples else 0
            if silenced and last == 200:
                problems.append(f"{name}: says 'ready' while {silenced} clients hear nothing")
        return problems

    async def _back_to_idle(self, worker: Worker) -> bool:
        return await idle_state(self.http, worker) == self.idle.get(worker.name, (0, 0))

    async def stop_probes(self) -> None:
        for probe in self.probes:
            await probe.stop()

    async def idle_problems(self, timeout_s: float = 15) -> list[str]:
        """Open streams and memory of every live worker back to idle."""
        live = [w for w in self.stack.worker_processes if w.running]
        problems = []
        self.rss_growth = 0
        for worker in live:
            try:
                await wait_until(
                    functools.partial(self._back_to_idle, worker),
                    timeout_s,
                    f"{worker.name} to hold no stream",
                )
            except AssertionError as error:
                streams, channels = await idle_state(self.http, worker)
                problems.append(f"{error}: {streams:.0f} streams, {channels:.0f} channels")
        for worker in live:
            grown = rss_bytes(worker) - self.rss_before.get(worker.name, rss_bytes(worker))
            self.rss_growth = max(self.rss_growth, grown)
            if grown > MEMORY_SLACK_BYTES:
                problems.append(
                    f"{worker.name}: {grown / 2**20:.0f} MiB above idle after the fault"
                )
        return problems
