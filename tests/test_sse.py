"""The wire format: exact bytes, multi-line data, and refusal of field injection."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import sse

from sse_reader import SSEParser


def test_plain_event_bytes() -> None:
    assert sse.Event(data="hello").encode() == b"data: hello\n\n"


def test_named_event_with_id_bytes() -> None:
    frame = sse.Event(data="done", event="finish", id="17-0").encode()
    assert frame == b"id: 17-0\nevent: finish\ndata: done\n\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("", b"data: \n\n"),
        ("trailing\n", b"data: trailing\ndata: \n\n"),
        ("结束", "data: 结束\n\n".encode()),
    ],
)
def test_every_line_of_data_gets_its_own_field(data: str, expected: bytes) -> None:
    assert sse.Event(data=data).encode() == expected


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\x00b", "\n"])
@pytest.mark.parametrize("field", ["event", "id"])
def test_line_breaks_and_nul_in_fields_are_refused(field: str, bad: str) -> None:
    with pytest.raises(ValueError, match=field):
        sse.Event(data="x", **{field: bad})


def test_injection_attempt_cannot_forge_an_event() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        sse.Event(data="x", event="message\ndata: forged\n\nevent: finish")


def test_comment_and_retry_frames() -> None:
    assert sse.PING == b": ping\n\n"
    assert sse.comment("a\nb") == b": a\n: b\n\n"
    assert sse.retry(1500) == b"retry: 1500\n\n"
    with pytest.raises(ValueError, match="negative"):
        sse.retry(-1)


_field_text = st.text(alphabet=st.characters(blacklist_characters="\r\n\x00"), max_size=30)


@given(
    data=st.text(),
    event=st.none() | _field_text.filter(lambda s: s != ""),
    event_id=st.none() | _field_text,
)
def test_round_trip_through_an_eventsource_parser(
    data: str, event: str | None, event_id: str | None
) -> None:
    frame = sse.Event(data=data, event=event, id=event_id).encode().decode()
    received = SSEParser().feed(frame)
    assert len(received) == 1
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert received[0].data == expected
    assert received[0].event == (event or "message")
    assert received[0].id == (event_id or "")
