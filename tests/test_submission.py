"""Parsing publish bodies: shapes, field rules and limits, without a server."""

from __future__ import annotations

import json

import pytest

from service.errors import EventTooLarge, InvalidEvent, MalformedJson
from service.submission import MAX_BATCH_EVENTS, Submission, parse_body, serialize_data

LIMIT = 1024


def parse(value: object) -> tuple[list[Submission], bool]:
    return parse_body(json.dumps(value).encode(), LIMIT)


def test_single_event_with_name() -> None:
    assert parse({"event": "payment", "data": "paid"}) == ([Submission("payment", "paid")], False)


def test_event_name_is_optional() -> None:
    assert parse({"data": "x"}) == ([Submission("", "x")], False)


def test_batch_keeps_order() -> None:
    events, batch = parse([{"data": "1"}, {"event": "finish", "data": "2"}])
    assert batch
    assert events == [Submission("", "1"), Submission("finish", "2")]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"b": [1, 2.5, None], "a": "ü"}, '{"b":[1,2.5,null],"a":"ü"}'),
        (None, "null"),
        (True, "true"),
        (42, "42"),
        ("as is\nwith ✓", "as is\nwith ✓"),
    ],
)
def test_data_serialization(value: object, text: str) -> None:
    assert serialize_data(value) == text


def test_data_limit_counts_utf8_bytes() -> None:
    at_limit = "é" * (LIMIT // 2)
    assert parse({"data": at_limit})[0][0].data == at_limit
    with pytest.raises(EventTooLarge):
        parse({"data": at_limit + "x"})


def test_serialized_data_counts_towards_the_limit() -> None:
    with pytest.raises(EventTooLarge):
        parse({"data": ["x" * 300] * 4})


@pytest.mark.parametrize(
    "value",
    [
        "just a string",
        7,
        {"event": "x"},
        {"data": "x", "id": "1-1"},
        {"data": "x", "extra": 1},
        {"data": "x", "event": ""},
        {"data": "x", "event": "two words"},
        {"data": "x", "event": "line\nbreak"},
        {"data": "x", "event": "x\n"},  # `$` alone would match before the final newline
        {"data": "x", "event": "x\r"},
        [{"data": "x", "event": "ok"}, {"data": "y", "event": "trailing\n"}],
        {"data": "x", "event": "nul\u0000"},
        {"data": "x", "event": "x" * 65},
        {"data": "x", "event": None},
        {"data": "x", "event": 5},
        {"data": "x", "event": "gap"},  # the service's own signal of lost history
        {"data": "x", "event": "unauthorized"},  # the service's own: a token expired
        {"data": "x", "event": "error"},  # EventSource's own events
        {"data": "x", "event": "open"},
        [{"data": "x"}, {"data": "y", "event": "gap"}],
        [],
        [{"data": "x"}] * (MAX_BATCH_EVENTS + 1),
        [{"data": "x"}, "not an object"],
    ],
)
def test_invalid_events_are_refused(value: object) -> None:
    with pytest.raises(InvalidEvent):
        parse(value)


def test_lone_surrogate_in_data_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        parse_body(b'{"data": "\\ud800"}', LIMIT)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b'{"data": NaN}',
        b'{"data": Infinity}',
        b"[" * 100_000,
        b'{"data": ' + b"9" * 5000 + b"}",
        b'{"data": 1e999}',
        b'{"data": -1e999}',
        b'{"data": {"nested": [1, 2e400]}}',
        b'[{"data": 1}, {"data": 1E+309}]',
    ],
)
def test_malformed_json_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedJson):
        parse_body(body, LIMIT)


def test_batch_limit_is_inclusive() -> None:
    events, _ = parse([{"data": str(i)} for i in range(MAX_BATCH_EVENTS)])
    assert len(events) == MAX_BATCH_EVENTS
