"""A listener's `direct` handler: first refusal on each item while the inbox is empty."""

from __future__ import annotations

import asyncio

import pytest

from service.mailbox import HUB_ENDS, InboxItem, Incoming, Listener, Resync, StreamEnd


def incoming(n: int) -> Incoming:
    return Incoming(f"{n}-0\n\nm{n}".encode())


class Recorder:
    """A direct handler that accepts what `accept` says and records what it was offered."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.seen: list[InboxItem] = []

    def __call__(self, item: InboxItem) -> bool:
        self.seen.append(item)
        return self.accept


async def test_items_the_handler_accepts_never_reach_take() -> None:
    listener = Listener(limit=2)
    handler = Recorder()
    listener.direct = handler
    items = [incoming(n) for n in range(10)]  # more than the inbox could hold
    for item in items:
        assert listener.offer(item)
    assert handler.seen == items
    assert await listener.take(0.01) == []
    assert listener.ended is None


async def test_a_declined_item_and_everything_after_it_queue_in_order() -> None:
    listener = Listener(limit=10)
    handler = Recorder()
    listener.direct = handler
    first, second, declined, later, last = (incoming(n) for n in range(5))
    listener.offer(first)
    listener.offer(second)
    handler.accept = False
    listener.offer(declined)
    handler.accept = True  # it would take these, but the inbox is not empty
    listener.offer(later)
    listener.offer(last)
    assert handler.seen == [first, second, declined]
    assert await listener.take(1) == [declined, later, last]
    # Drained: the handler gets the next item first again.
    after = incoming(5)
    listener.offer(after)
    assert handler.seen[-1] is after
    assert await listener.take(0.01) == []


async def test_a_resync_marker_is_offered_to_the_handler_like_any_item() -> None:
    listener = Listener(limit=10)
    handler = Recorder(accept=False)
    listener.direct = handler
    item = incoming(1)
    listener.offer(Resync.AFTER_RECONNECT)
    listener.offer(item)
    assert handler.seen == [Resync.AFTER_RECONNECT]
    assert await listener.take(1) == [Resync.AFTER_RECONNECT, item]


async def test_an_accepted_item_does_not_wake_take_but_a_queued_one_does() -> None:
    listener = Listener(limit=10)
    handler = Recorder()
    listener.direct = handler
    taking = asyncio.create_task(listener.take(5))
    await asyncio.sleep(0)
    listener.offer(incoming(1))
    await asyncio.sleep(0.02)
    assert not taking.done()
    handler.accept = False
    queued = incoming(2)
    listener.offer(queued)
    async with asyncio.timeout(1):
        assert await taking == [queued]


async def test_without_a_handler_every_item_is_queued() -> None:
    listener = Listener(limit=10)
    items = [incoming(n) for n in range(3)]
    for item in items:
        listener.offer(item)
    assert await listener.take(1) == items


async def test_declined_items_count_against_the_inbox_limit() -> None:
    listener = Listener(limit=2)
    handler = Recorder(accept=False)
    listener.direct = handler
    assert listener.offer(incoming(1))
    assert listener.offer(incoming(2))
    assert not listener.offer(incoming(3))
    assert listener.ended is StreamEnd.SLOW
    assert len(handler.seen) == 1  # only while the inbox was empty


@pytest.mark.parametrize("reason", list(HUB_ENDS))
async def test_an_ended_listener_ignores_offers(reason: StreamEnd) -> None:
    listener = Listener(limit=10)
    handler = Recorder()
    listener.direct = handler
    queued_before = incoming(0)
    handler.accept = False
    listener.offer(queued_before)
    listener.end(reason)
    handler.accept = True
    assert listener.offer(incoming(1))  # accepted (not "full"), but dropped
    assert listener.offer(Resync.AFTER_RECONNECT)
    assert handler.seen == [queued_before]
    assert listener.ended is reason
    # What was queued before the end is still handed over, then nothing more.
    assert await listener.take(1) == [queued_before]
    async with asyncio.timeout(1):
        assert await listener.take(5) == []


async def test_a_coalescing_listener_wakes_when_full_and_is_never_dropped() -> None:
    listener = Listener(limit=2, coalescing=True)
    items = [incoming(n) for n in range(50)]
    assert all(listener.offer(item) for item in items)
    assert listener.ended is None
    assert await listener.take(1) == items[:2]  # the content of wake-ups does not matter
    taking = asyncio.create_task(listener.take(5))
    await asyncio.sleep(0)
    for item in items:
        listener.offer(item)
    async with asyncio.timeout(1):
        assert len(await taking) == 2
    assert listener.ended is None
