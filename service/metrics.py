"""Prometheus metrics: plain counters bumped on the request path, read by a collector at scrape.

Nothing here touches the per-event hot path: streams already count what they write, and the
hub and publisher keep their own integers. `StreamMetrics` only sees a stream open and close;
the collector turns every counter into Prometheus families when `/metrics` is scraped. Each
app has its own `CollectorRegistry`, so several apps in one process never share a series.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .connection_stats import ConnectionStats
from .hub import Hub
from .mailbox import StreamEnd
from .publisher import Publisher

# The classic text format every Prometheus version scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "sse"


class StreamCounts(Protocol):
    """What metrics read of a stream: what it wrote, and what waits to reach its client."""

    @property
    def events_sent(self) -> int:
        """Events written to the client so far, replayed ones included."""

    @property
    def events_replayed(self) -> int:
        """Of those, the events read from the session's log."""

    @property
    def buffered_bytes(self) -> int:
        """Bytes written for the client that its socket has not sent yet."""

    @property
    def unsent_since(self) -> float | None:
        """When the oldest event not yet written arrived (time.monotonic()), if any."""


class OpenStream(StreamCounts, Protocol):
    """An open stream as the worker keeps it: counted, and ended one by one on a drain."""

    @property
    def session_id(self) -> str:
        """The session whose events the stream writes."""

    def drain(self, farewell: bytes) -> None:
        """End the stream for shutdown after what it holds, `farewell` its last frame."""


class StreamMetrics:
    """Open streams, and totals of the streams that already ended."""

    def __init__(self) -> None:
        self._open: set[OpenStream] = set()
        self._ended: Counter[StreamEnd] = Counter()
        self._deferred = 0
        self._delivered_by_ended = 0
        self._replayed_by_ended = 0

    def opened(self, stream: OpenStream) -> None:
        """A stream started writing to its client."""
        self._open.add(stream)

    def closed(self, stream: OpenStream, reason: StreamEnd) -> None:
        """A stream ended; fold its counts into the totals."""
        self._open.discard(stream)
        self._ended[reason] += 1
        self._delivered_by_ended += stream.events_sent
        self._replayed_by_ended += stream.events_replayed

    def deferred(self) -> None:
        """A stream request was told to come back later (busy, draining, Redis away)."""
        self._deferred += 1

    @property
    def deferred_count(self) -> int:
        """Stream requests told to come back later."""
        return self._deferred

    def open_streams(self) -> tuple[OpenStream, ...]:
        """The streams open now (a copy: scrapes may run while streams come and go)."""
        return tuple(self._open)

    @property
    def open_count(self) -> int:
        """Streams open now."""
        return len(self._open)

    @property
    def events_delivered(self) -> int:
        """Events written to clients, by ended and open streams alike."""
        return self._delivered_by_ended + sum(s.events_sent for s in self._open)

    @property
    def events_replayed(self) -> int:
        """Of the delivered events, those read from a session's log rather than live."""
        return self._replayed_by_ended + sum(s.events_replayed for s in self._open)

    def ended(self, reason: StreamEnd) -> int:
        """Streams that ended for `reason`."""
        return self._ended[reason]


class ServiceCollector:
    """Reads the worker's counters into metric families at scrape time."""

    def __init__(
        self,
        streams: StreamMetrics,
        hub: Hub,
        publisher: Publisher,
        connections: ConnectionStats,
    ) -> None:
        self._streams = streams
        self._hub = hub
        self._publisher = publisher
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        """Every family, freshly read; called by the registry on each scrape."""
        streams, hub = self._streams, self._hub
        yield _gauge("open_streams", "SSE streams open on this worker", streams.open_count)
        yield _counter(
            "events_delivered", "Events written to SSE clients", streams.events_delivered
        )
        yield _counter(
            "events_replayed",
            "Events written from a session's log (resume or catch-up), part of delivered",
            streams.events_replayed,
        )
        yield _counter(
            "streams_deferred",
            "Stream requests told to reconnect later (Redis away, worker full or draining)",
            streams.deferred_count,
        )
        yield _counter(
            "events_published",
            "Events this process logged and published",
            self._publisher.events_published,
        )
        yield _counter(
            "slow_clients_dropped",
            "Streams cut off because their client fell a full inbox behind",
            hub.stats.slow_listeners_dropped,
        )
        yield _counter(
            "redis_reconnects",
            "Times the shared subscription connection was re-established",
            hub.stats.reconnects,
        )
        yield _counter(
            "hub_messages_received",
            "Pub/sub messages the shared subscription received for local listeners",
            hub.stats.messages_received,
        )
        yield _gauge("hub_channels", "Channels subscribed for local listeners", hub.channel_count)
        yield _gauge(
            "hub_connected", "1 while the shared subscription is connected", int(hub.connected)
        )
        ended = CounterMetricFamily(
            f"{PREFIX}_streams_ended", "SSE streams ended, by reason", labels=["reason"]
        )
        for reason in StreamEnd:
            ended.add_metric([reason.value], streams.ended(reason))
        yield ended
        yield from self._connection_families()

    def _connection_families(self) -> Iterator[Metric]:
        connections = self._connections
        yield _gauge(
            "client_connections", "Client connections open, streams included", connections.open
        )
        if connections.cap is not None:
            yield _gauge(
                "client_connection_cap",
                "Client connections this worker holds at most (open-file limit - fd_reserve)",
                connections.cap,
            )
        yield _counter(
            "client_connections_refused",
            "Connections closed unserved because the worker was at its connection cap",
            connections.refused,
        )
        yield _counter(
            "accept_failures",
            "Times accept() failed for want of files or memory, pausing accepts briefly",
            connections.accept_failures,
        )
        timeouts = CounterMetricFamily(
            f"{PREFIX}_request_timeouts",
            "Connections closed because a request head or body did not arrive in time",
            labels=["phase"],
        )
        timeouts.add_metric(["headers"], connections.header_timeouts)
        timeouts.add_metric(["body"], connections.body_timeouts)
        yield timeouts


def build_registry(collector: ServiceCollector) -> CollectorRegistry:
    """A registry of this app's own, holding only `collector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
    return generate_latest(registry)


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _gauge(name: str, documentation: str, value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
