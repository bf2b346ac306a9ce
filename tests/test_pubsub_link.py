"""Which subscribe commands a link sends: one for plain pub/sub, one per hash slot for sharded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from service.keys import Keys
from service.redis.pubsub_link import PLAIN, SHARDED, subscribe_batches

KEYS = Keys()
CHANNELS = [KEYS.channel(f"s{n}").encode() for n in range(50)] + [
    KEYS.hub_control.encode(),
    KEYS.producer_wake.encode(),
]


def test_plain_pub_sub_subscribes_everything_in_one_command() -> None:
    assert subscribe_batches(PLAIN, CHANNELS) == [CHANNELS]


def test_sharded_pub_sub_sends_one_command_per_hash_slot() -> None:
    batches = subscribe_batches(SHARDED, CHANNELS)
    slots = [{key_slot(channel) for channel in batch} for batch in batches]
    assert all(len(batch_slots) == 1 for batch_slots in slots)  # no CROSSSLOT
    assert len(batches) == len({key_slot(channel) for channel in CHANNELS})
    assert sorted(c for batch in batches for c in batch) == sorted(CHANNELS)


def test_channels_sharing_a_slot_go_in_one_command_in_order() -> None:
    same_session = [b"sse:{a}:events", b"other:{a}:events", b"third:{a}"]
    assert subscribe_batches(SHARDED, same_session) == [same_session]


def test_nothing_to_subscribe_sends_nothing() -> None:
    assert subscribe_batches(PLAIN, []) == []
    assert subscribe_batches(SHARDED, []) == []


@given(st.lists(st.binary(min_size=1, max_size=12), max_size=40))
def test_every_channel_is_subscribed_exactly_once(channels: list[bytes]) -> None:
    for dialect in (PLAIN, SHARDED):
        batches = subscribe_batches(dialect, channels)
        sent = [c for batch in batches for c in batch]
        assert sorted(sent) == sorted(set(channels))
        assert all(batches)
        if dialect is SHARDED:
            assert all(len({key_slot(c) for c in batch}) == 1 for batch in batches)
