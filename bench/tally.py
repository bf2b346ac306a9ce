"""What receivers saw: latencies, loss, reordering; and percentile helpers."""

from __future__ import annotations

import asyncio
import time

from .sse_client import SSEStream


def percentile_ms(sorted_ns: list[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in milliseconds (-1: none)."""
    if not sorted_ns:
        return -1.0
    index = min(len(sorted_ns) - 1, int(fraction * len(sorted_ns)))
    return sorted_ns[index] / 1e6


def event_data(seq: int, sent_ns: int | None = None) -> str:
    """Data of event `seq`: its sequence number and the send time (monotonic ns, default now)."""
    return f"{seq} {time.monotonic_ns() if sent_ns is None else sent_ns}"


def id_position(event_id: bytes) -> tuple[int, int]:
    """An SSE id as a comparable position; ValueError if it is neither form below.

    The service's ids are Redis stream entry ids, `<ms>-<seq>`; nchan's are `<s>:<seq>`.
    """
    sep = b":" if b":" in event_id else b"-"
    time_part, _, seq_part = event_id.partition(sep)
    return int(time_part), int(seq_part or 0)


class Tally:
    """Checks every event a stream receives: in sequence, with increasing ids, none missing.

    Events carry `<seq> <send ns>` as data; the clock is CLOCK_MONOTONIC, shared by every
    process on the machine, so the publisher's process and the receivers' agree on it.
    """

    def __init__(self, streams: int, events_per_stream: int) -> None:
        self.expected = streams * events_per_stream
        self.latencies_ns: list[int] = []
        self.last_receiver_ns = [0] * events_per_stream  # slowest receiver of each event
        self.reordered = 0
        self.skipped = 0
        self.finished = 0
        self.first_ns = 0
        self.last_ns = 0
        self._streams = streams
        self._next_seq = [0] * streams
        self._last_id: list[tuple[int, int]] = [(0, 0)] * streams
        self.all_finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wanted = 0
        self._reached: asyncio.Future[None] | None = None

    def until_received(self, count: int) -> asyncio.Future[None]:
        """Resolved once `count` events have been received in all."""
        future = asyncio.get_running_loop().create_future()
        if self.received >= count:
            future.set_result(None)
        else:
            self._wanted, self._reached = count, future
        return future

    def sink(self, stream: SSEStream, event_id: bytes, event: bytes, data: bytes) -> None:
        now = time.monotonic_ns()
        tag = stream.tag
        seq_text, _, sent_text = data.partition(b" ")
        seq = int(seq_text)
        latency = now - int(sent_text)
        self.latencies_ns.append(latency)
        if self._reached is not None and len(self.latencies_ns) >= self._wanted:
            if not self._reached.done():
                self._reached.set_result(None)
            self._reached = None
        self.last_receiver_ns[seq] = max(self.last_receiver_ns[seq], latency)
        expected = self._next_seq[tag]
        if seq < expected:
            self.reordered += 1
        else:
            self.skipped += seq - expected
            self._next_seq[tag] = seq + 1
        position = id_position(event_id)
        if position <= self._last_id[tag]:
            self.reordered += 1
        self._last_id[tag] = position
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        if event == b"finish":
            self.finished += 1
            if self.finished == self._streams and not self.all_finished.done():
                self.all_finished.set_result(None)

    def expect_streams(self, streams: int) -> None:
        """Only `streams` connected: expect events (and a `finish`) on that many."""
        self._streams = streams
        self.expected = streams * len(self.last_receiver_ns)
        if self.finished >= streams and not self.all_finished.done():
            self.all_finished.set_result(None)

    @property
    def received(self) -> int:
        return len(self.latencies_ns)

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.latencies_ns)
        last = sorted(self.last_receiver_ns)
        return {
            "received": self.received,
            "lost": max(0, self.expected - self.received),
            "reordered": self.reordered,
            "p50_ms": round(percentile_ms(ordered, 0.50), 3),
            "p99_ms": round(percentile_ms(ordered, 0.99), 3),
            "max_ms": round(ordered[-1] / 1e6, 3) if ordered else -1.0,
            "last_receiver_p99_ms": round(percentile_ms(last, 0.99), 3),
        }
