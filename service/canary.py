"""Readiness that proves delivery: a canary through every pub/sub connection the worker holds.

A pub/sub connection can look healthy and deliver nothing: the server paused, a proxy or a
stray UNSUBSCRIBE that took the subscriptions away while the socket stays open and PINGs are
answered. So the worker keeps one canary channel subscribed on each of its pub/sub
connections (one per shard on a cluster), through the hub like any stream's channel, and
every `canary_interval_s` publishes a token to each and waits for it to come back within
`canary_timeout_s`. `/readyz` reads the latest round and never publishes itself, so probes
cost Redis nothing however often they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from .hub import Hub
from .keys import Keys
from .mailbox import Incoming, Listener
from .metrics import PREFIX
from .redis.connections import RedisClient
from .redis.topology import publish_command
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Hash tags tried to find a canary channel on each cluster shard: with N shards a random tag
# misses a given one with probability 1 - 1/N, so this many tries fail only by a bug.
MAX_TAG_TRIES = 10_000
# A round older than this many intervals (plus its deadline) means the canary itself stopped.
STALE_ROUNDS = 2
# How soon a round follows one that failed.
RETRY_AFTER_FAILURE_S = 0.25


@dataclass(frozen=True, slots=True)
class CanaryRound:
    """What the latest round found."""

    finished_at: float  # time.monotonic()
    links: int  # pub/sub connections probed
    failed: int  # of those, how many did not deliver in time
    round_trip_s: float | None  # the slowest canary's round trip, when all came back

    @property
    def ok(self) -> bool:
        return self.links > 0 and self.failed == 0


@dataclass(slots=True)
class _Probe:
    """The canary channel kept subscribed on one pub/sub connection."""

    node: str
    channel: str
    listener: Listener
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)


class Canary:
    """Proves, round after round, that each pub/sub connection of the hub delivers."""

    def __init__(
        self,
        hub: Hub,
        redis: RedisClient,
        keys: Keys,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._redis = redis
        self._keys = keys
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._publish = publish_command(redis)
        # Canary channels are this worker's own: another worker's canary proves nothing here.
        self._worker = secrets.token_hex(6)
        self._probes: dict[str, _Probe] = {}
        self._task: asyncio.Task[None] | None = None
        self.latest: CanaryRound | None = None
        self.rounds = 0
        self.failures = 0  # rounds that found a connection not delivering
        self.last_round_trip_s: float | None = None  # of the latest round that came back whole

    async def start(self) -> None:
        """Run a first round (so readiness is known at once), then one every interval."""
        await self.run_round()
        self._task = asyncio.create_task(self._run_forever(), name="canary")

    async def close(self) -> None:
        """Stop the rounds and leave the canary channels."""
        await cancel_and_wait([self._task])
        self._task = None
        for node in list(self._probes):
            await self._drop(node)

    @property
    def problem(self) -> str | None:
        """Why readiness must fail, in words that name no server; None while canaries arrive."""
        latest = self.latest
        if latest is None:
            return "delivery check: no round has completed yet"
        stale_s = STALE_ROUNDS * (self._interval_s + self._timeout_s)
        if self._clock() - latest.finished_at > stale_s:
            return "delivery check: no round completed recently"
        if latest.links == 0:
            return "delivery check: no pub/sub connection to check"
        if latest.failed:
            return (
                f"delivery check: {latest.failed} of {latest.links} pub/sub connections did "
                f"not deliver within {self._timeout_s:g}s"
            )
        return None

    async def run_round(self) -> CanaryRound:
        """Publish a canary through every pub/sub connection and wait for each to arrive."""
        nodes = self._hub.link_nodes
        for node in list(self._probes):
            if node not in nodes or not self._still_routed(self._probes[node]):
                await self._drop(node)
        self.rounds += 1
        token = f"{self._worker}:{self.rounds}".encode()
        outcomes = await asyncio.gather(*(self._check(node, token) for node in nodes))
        trips = [trip for trip in outcomes if trip is not None]
        was_ok = self.latest is None or self.latest.ok
        result = self.latest = CanaryRound(
            finished_at=self._clock(),
            links=len(nodes),
            failed=len(outcomes) - len(trips),
            round_trip_s=max(trips) if trips and len(trips) == len(outcomes) else None,
        )
        if result.ok:
            self.last_round_trip_s = result.round_trip_s
            if not was_ok:
                log.info("delivery check passes again on %d pub/sub connections", len(nodes))
        else:
            self.failures += 1
            if was_ok:
                log.warning("%s", self.problem)
        return result

    async def _run_forever(self) -> None:
        while True:
            # After a failed round look again soon: readiness should return within a fraction
            # of a second of delivery, not a whole interval later; still one round at a time.
            failing = self.latest is not None and not self.latest.ok
            await asyncio.sleep(
                min(self._interval_s, RETRY_AFTER_FAILURE_S) if failing else self._interval_s
            )
            try:
                await self.run_round()
            except Exception:
                # The rounds must go on: a round that died leaves readiness stale, not green.
                log.exception("delivery check round failed")

    async def _check(self, node: str, token: bytes) -> float | None:
        """The round trip of `token` through `node`'s connection, or None if not in time."""
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                probe = self._probes.get(node) or await self._open(node)
                await self._redis.execute_command(self._publish, probe.channel, token)
                await _arrival(probe.listener, token)
        except (TimeoutError, RedisError, OSError, LookupError) as error:
            log.debug("canary through %s failed: %r", node, error)
            if node in self._probes and self._probes[node].listener.ended is not None:
                await self._drop(node)
            return None
        return self._clock() - started

    async def _open(self, node: str) -> _Probe:
        channel = self._channel_on(node)
        stack = contextlib.AsyncExitStack()
        try:
            listener = await stack.enter_async_context(
                self._hub.listen(channel, coalescing=True, probe=True)
            )
        except BaseException:
            await stack.aclose()
            raise
        probe = self._probes[node] = _Probe(node, channel, listener, stack)
        return probe

    async def _drop(self, node: str) -> None:
        probe = self._probes.pop(node, None)
        if probe is not None:
            with contextlib.suppress(RedisError, OSError):
                await probe.stack.aclose()

    def _still_routed(self, probe: _Probe) -> bool:
        """The probe's channel still lives on its node (a cluster slot may have moved)."""
        try:
            return self._hub.node_for(probe.channel) == probe.node
        except (RedisError, LookupError):
            return False

    def _channel_on(self, node: str) -> str:
        """A canary channel of this worker whose slot lives on `node`."""
        for tag in range(MAX_TAG_TRIES):
            channel = self._keys.canary(f"{self._worker}-{tag}")
            if self._hub.node_for(channel) == node:
                return channel
        raise LookupError("no canary channel maps to a pub/sub connection")


async def _arrival(listener: Listener, token: bytes) -> None:
    """Wait until `token` comes through `listener` (older tokens and markers are skipped)."""
    while True:
        if listener.ended is not None:
            raise LookupError(f"the canary listener ended ({listener.ended.value})")
        items = await listener.take(3600.0)  # bounded by the caller's deadline
        if any(isinstance(item, Incoming) and item.payload == token for item in items):
            return


class CanaryCollector:
    """The canary's latest round as metrics."""

    def __init__(self, canary: Canary) -> None:
        self._canary = canary

    def collect(self) -> Iterator[Metric]:
        """Read at scrape time."""
        canary = self._canary
        latest = canary.latest
        yield GaugeMetricFamily(
            f"{PREFIX}_canary_ok",
            "1 while the latest canary round came back through every pub/sub connection",
            value=int(canary.problem is None),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_canary_round_trip_seconds",
            "Round trip of the slowest canary of the latest round that came back whole",
            value=canary.last_round_trip_s or 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_canary_links",
            "Pub/sub connections the latest canary round checked",
            value=latest.links if latest is not None else 0,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_canary_failures",
            "Canary rounds in which a pub/sub connection did not deliver in time",
            value=self._canary.failures,
        )
