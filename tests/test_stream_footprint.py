"""What a worker keeps for each open stream stays small: no per-instance dict on its objects.

A worker holds thousands of idle streams, so every object kept for one is multiplied by them
(docs/benchmarks.md, "An idle stream's memory"). A class that loses its `__slots__` (a new
attribute assigned outside them, a base class without them) gains a dict of some 100 bytes
a stream; these tests say so before a benchmark would.
"""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from service.admission import Admission
from service.chunked import ChunkWriter
from service.hub import Hub
from service.mailbox import Listener
from service.stream import EventStream, StreamPlan


class Transport(asyncio.WriteTransport):
    def get_write_buffer_size(self) -> int:
        return 0


def stream() -> EventStream:
    plan = StreamPlan(
        session_id="s",
        replay_after="0-0",
        detect_gap=False,
        ttl_ms=60_000,
        retry_ms=500,
        heartbeat_interval_s=5.0,
        write_timeout_s=5.0,
    )
    return EventStream(
        object(),  # type: ignore[arg-type]
        Listener(4),
        object(),  # type: ignore[arg-type]
        plan,
        Transport(),
        direct_writes=True,
    )


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(stream, id="EventStream"),
        pytest.param(lambda: Listener(4), id="Listener"),
        pytest.param(lambda: ChunkWriter(Transport(), 1024), id="ChunkWriter"),
        pytest.param(lambda: Admission(10, 10).admit("s"), id="admission place"),
        pytest.param(
            lambda: Hub(fakeredis.FakeAsyncRedis(), "control", 4).listen("c"), id="hub listen block"
        ),
    ],
)
def test_an_object_kept_per_stream_has_no_instance_dict(make: object) -> None:
    kept = make()  # type: ignore[operator]
    assert not hasattr(kept, "__dict__"), f"{type(kept).__name__} has a per-instance dict"


def test_an_admission_place_is_given_back_when_its_block_ends() -> None:
    admission = Admission(max_streams=1, max_streams_per_session=1)
    with admission.admit("s"):
        assert admission.admitted == 1
    assert admission.admitted == 0
    with pytest.raises(RuntimeError), admission.admit("s"):
        raise RuntimeError("the stream failed")
    assert admission.admitted == 0
    with admission.admit("s"):  # the place was freed for the session too
        pass
