"""The pub/sub payload and its decoded Delivery: checks on decode, the frame, equality."""

from __future__ import annotations

import pytest

from service.envelope import Delivery, decode_log_entry, decode_payload
from service.sse import Event


def test_a_payload_decodes_to_its_id_name_and_data() -> None:
    delivery = decode_payload("7-3\nnews\nline one\nline two\r\n结束".encode())
    assert (delivery.id, delivery.event, delivery.data) == (
        "7-3",
        "news",
        "line one\nline two\r\n结束",
    )
    assert delivery.position == (7, 3)
    assert delivery.frame == Event(data=delivery.data, event="news", id="7-3").encode()
    assert delivery.frame == (
        "id: 7-3\nevent: news\ndata: line one\ndata: line two\ndata: 结束\n\n".encode()
    )
    assert not delivery.is_finish


def test_an_unnamed_event_has_no_event_line_and_finish_is_recognised() -> None:
    assert decode_payload(b"1-0\n\nhi").frame == b"id: 1-0\ndata: hi\n\n"
    assert decode_payload(b"2-0\nfinish\nbye").is_finish
    assert not decode_payload(b"2-0\nfinished\nbye").is_finish


@pytest.mark.parametrize("name", ["a\rb", "\r", "fin\x00ish", "\x00"])
def test_cr_or_nul_in_the_event_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="event must not contain"):
        decode_payload(b"1-0\n" + name.encode() + b"\ndata")


@pytest.mark.parametrize(
    "event_id",
    [
        "",
        "1",
        "1-",
        "-1",
        "a-0",
        "1-0\r",
        " 1-0",
        "1-0 ",
        "1-0-0",
        "1.0-0",
        "+1-0",
        "١-٠",
        "1" * 20 + "-0",
        "0-" + "9" * 20,
    ],
)
def test_a_malformed_id_is_refused(event_id: str) -> None:
    with pytest.raises(ValueError, match="not an event id"):
        decode_payload(event_id.encode() + b"\n\ndata")


@pytest.mark.parametrize("payload", [b"", b"1-0", b"1-0\nname-without-data"])
def test_a_payload_without_id_and_name_lines_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="lacks id or event name"):
        decode_payload(payload)


def test_bytes_that_are_not_utf8_are_a_value_error() -> None:
    # The hub treats any ValueError as a malformed message; a decode error must be one.
    with pytest.raises(ValueError, match="utf-8"):
        decode_payload(b"1-0\n\n\xff\xfe")


def test_each_id_part_is_at_most_19_digits() -> None:
    top = "18446744073709551615"  # 2**64 - 1 has 20 digits: beyond the accepted 19
    with pytest.raises(ValueError, match="not an event id"):
        decode_payload(f"{top}-0\n\nx".encode())
    largest = "9" * 19
    assert decode_payload(f"{largest}-{largest}\n\nx".encode()).position == (
        int(largest),
        int(largest),
    )


def test_deliveries_are_equal_and_hash_alike_by_id_event_and_data() -> None:
    first = decode_payload(b"5-1\nnews\nhello")
    same = Delivery("5-1", "news", "hello")
    from_log = decode_log_entry(b"5-1", {b"e": b"news", b"d": b"hello"})
    assert first == same == from_log
    assert hash(first) == hash(same) == hash(from_log)
    assert len({first, same, from_log}) == 1
    for other in (
        Delivery("5-2", "news", "hello"),
        Delivery("5-1", "", "hello"),
        Delivery("5-1", "news", "hello!"),
    ):
        assert first != other
        assert other not in {first}
    assert first != ("5-1", "news", "hello")
    assert first.__eq__("5-1") is NotImplemented


def test_repr_names_the_fields_and_not_the_frame() -> None:
    assert repr(Delivery("5-1", "news", "a\nb")) == (
        "Delivery(id='5-1', event='news', data='a\\nb')"
    )


def test_a_delivery_holds_only_its_slots() -> None:
    delivery = Delivery("1-0", "", "x")
    with pytest.raises(AttributeError):
        delivery.extra = 1  # type: ignore[attr-defined]


def test_a_log_entry_without_fields_is_an_unnamed_empty_event() -> None:
    delivery = decode_log_entry(b"3-0", {})
    assert (delivery.event, delivery.data) == ("", "")
    assert delivery.frame == b"id: 3-0\ndata: \n\n"
