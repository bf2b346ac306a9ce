"""The wire format: exact bytes, multi-line data, and refusal of field injection."""

import re
from dataclasses import dataclass

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


def test_comment_and_retry_lines_have_no_blank_line_of_their_own() -> None:
    # A blank line after them would be an empty message in clients that hand every block
    # to the application; the next event's blank line ends their block instead.
    assert sse.PING == b": ping\n"
    assert sse.comment("connected") == b": connected\n"
    assert sse.comment("a\nb") == b": a\n: b\n"
    assert sse.comment() == b": \n"
    assert sse.retry(1500) == b"retry: 1500\n"
    assert sse.retry(0) == b"retry: 0\n"
    with pytest.raises(ValueError, match="negative"):
        sse.retry(-1)


def test_a_stream_opening_then_events_reads_as_the_events_alone() -> None:
    stream = (
        sse.retry(2000)
        + sse.comment("connected")
        + sse.Event(data="one", id="1-0").encode()
        + sse.PING
        + sse.PING
        + sse.Event(data="two", event="finish", id="2-0").encode()
    )
    assert stream == (
        b"retry: 2000\n: connected\nid: 1-0\ndata: one\n\n"
        b": ping\n: ping\nid: 2-0\nevent: finish\ndata: two\n\n"
    )
    assert _whatwg_read(stream) == (
        [_Dispatched("message", "one", "1-0"), _Dispatched("finish", "two", "2-0")],
        2000,
    )
    assert _blocks(stream) == [
        {"retry": "2000", "id": "1-0", "data": "one"},
        {"id": "2-0", "event": "finish", "data": "two"},
    ]


# No lone surrogates: they are not text that can be encoded (the API refuses them).
_field_text = st.text(
    alphabet=st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]),
    max_size=30,
)


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


# encode_fields is the per-delivery fast path behind Event.encode and Delivery.frame. It is
# checked two ways: byte for byte against the frame encoder it replaced, and by parsing its
# frames back with a parser written here from the WHATWG rules (not the shared test reader).


def _frame_as_before(data: str, event: str | None, event_id: str | None) -> bytes:
    """Event.encode as it was before the fast path: one `data:` line per line of data."""
    parts: list[str] = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if event is not None:
        parts.append(f"event: {event}\n")
    parts.extend(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", data))
    parts.append("\n")
    return "".join(parts).encode()


@dataclass
class _Dispatched:
    type: str
    data: str
    last_event_id: str


def _whatwg_lines(stream: bytes) -> list[str]:
    """The lines of an event stream: each ends at CRLF, a lone CR or a lone LF.

    A last line that no line end follows is not returned: it is not processed.
    """
    text = stream.decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines: list[str] = []
    start = index = 0
    while index < len(text):
        char = text[index]
        if char in "\r\n":
            lines.append(text[start:index])
            if char == "\r" and text[index + 1 : index + 2] == "\n":
                index += 1
            start = index + 1
        index += 1
    return lines


def _whatwg_parse(stream: bytes) -> list[_Dispatched]:
    """The events the HTML standard's event-stream interpretation (§9.2.6) dispatches."""
    return _whatwg_read(stream)[0]


def _whatwg_read(stream: bytes) -> tuple[list[_Dispatched], int | None]:
    """The dispatched events, and the reconnection time the stream set (None if it set none)."""
    lines = _whatwg_lines(stream)
    dispatched: list[_Dispatched] = []
    data_buffer, event_type, last_event_id = "", "", ""
    reconnection_time: int | None = None
    for line in lines:
        if line == "":
            if data_buffer:
                dispatched.append(
                    _Dispatched(event_type or "message", data_buffer[:-1], last_event_id)
                )
            data_buffer, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data_buffer += value + "\n"
        elif name == "id" and "\x00" not in value:
            last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            reconnection_time = int(value)
    return dispatched, reconnection_time


def _blocks(stream: bytes) -> list[dict[str, str]]:
    """The stream as clients read it that hand every blank-line-ended block to the application.

    `@microsoft/fetch-event-source` and `httpx-sse` do (the latter once it has seen an id):
    a block of only `retry:` or comments arrives as an empty message. Fields are kept as
    sent, the last of each name; a block without a blank line after it is never handed over.
    """
    blocks: list[dict[str, str]] = []
    block: dict[str, str] = {}
    for line in _whatwg_lines(stream):
        if line == "":
            blocks.append(block)
            block = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in block:
                value = block["data"] + "\n" + value
            block[name] = value
    return blocks


_LINE_BREAKS = st.sampled_from(["\r\n", "\r", "\n"])
# Characters other line-splitting functions treat as breaks (str.splitlines does), but
# the event stream does not: they must stay inside one data line.
_NOT_BREAKS = st.sampled_from(["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
_segment = st.lists(
    st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]) | _NOT_BREAKS,
    max_size=12,
).map("".join)


@st.composite
def _multiline_data(draw: st.DrawFn) -> str:
    """Text whose lines are separated by an arbitrary mix of CRLF, CR and LF."""
    segments = draw(st.lists(_segment, min_size=1, max_size=8))
    breaks = draw(st.lists(_LINE_BREAKS, min_size=len(segments) - 1, max_size=len(segments) - 1))
    return segments[0] + "".join(b + s for b, s in zip(breaks, segments[1:], strict=True))


@given(
    data=_multiline_data() | st.text(),
    event=st.none() | _field_text.filter(lambda s: s != ""),
    event_id=st.none() | _field_text,
)
def test_encode_fields_reads_back_as_the_original_event(
    data: str, event: str | None, event_id: str | None
) -> None:
    frame = _encode_fields(data, event, event_id)
    dispatched = _whatwg_parse(frame)
    assert len(dispatched) == 1
    assert dispatched[0].data == data.replace("\r\n", "\n").replace("\r", "\n")
    assert dispatched[0].type == (event or "message")
    assert dispatched[0].last_event_id == (event_id or "")


@given(
    data=_multiline_data() | st.text(),
    event=st.none() | _field_text,
    event_id=st.none() | _field_text,
)
def test_encode_fields_is_the_frame_event_encode_always_produced(
    data: str, event: str | None, event_id: str | None
) -> None:
    frame = _encode_fields(data, event, event_id)
    assert frame == _frame_as_before(data, event, event_id)
    assert sse.Event(data=data, event=event, id=event_id).encode() == frame


def _encode_fields(data: str, event: str | None, event_id: str | None) -> bytes:
    def utf8(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    return sse.encode_fields(data.encode(), utf8(event), utf8(event_id))


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("a\r\n\nb", ["a", "", "b"]),
        ("a\n\rb", ["a", "", "b"]),
        ("\r\r\n\n", ["", "", "", ""]),
        ("a\u2028b\x85c", ["a\u2028b\x85c"]),
        ("single line", ["single line"]),
    ],
)
def test_encode_fields_splits_only_on_cr_lf_and_crlf(data: str, lines: list[str]) -> None:
    expected = "".join(f"data: {line}\n" for line in lines) + "\n"
    assert _encode_fields(data, None, None) == expected.encode()
    assert [d.data for d in _whatwg_parse(expected.encode())] == ["\n".join(lines)]


# A stream as the service writes it: a `retry:` line and comments (the opening, heartbeats)
# anywhere between whole events.
_comment_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
_event = st.builds(
    sse.Event,
    data=_multiline_data() | st.text(max_size=20),
    event=st.none() | _field_text.filter(lambda s: s != ""),
    id=st.none() | _field_text,
)
_part = (
    st.integers(min_value=0, max_value=10**9).map(sse.retry)
    | _comment_text.map(sse.comment)
    | st.just(sse.PING)
    | _event
)


def _expected(parts: list[bytes | sse.Event], cut: int) -> tuple[list[_Dispatched], int | None]:
    """What a standard client has seen of `parts` when the stream ends after `cut` bytes."""
    dispatched: list[_Dispatched] = []
    last_id, reconnection_time, end = "", None, 0
    for part in parts:
        frame = part.encode() if isinstance(part, sse.Event) else part
        end += len(frame)
        if end > cut:
            break
        if isinstance(part, sse.Event):
            last_id = last_id if part.id is None else part.id
            data = part.data.replace("\r\n", "\n").replace("\r", "\n")
            dispatched.append(_Dispatched(part.event or "message", data, last_id))
        elif part.startswith(b"retry: "):
            reconnection_time = int(part.removeprefix(b"retry: "))
    return dispatched, reconnection_time


@given(parts=st.lists(_part, max_size=10), cut_at=st.floats(min_value=0, max_value=1))
@pytest.mark.slow  # a second or more: left out of the quick loop
def test_a_stream_reads_as_its_whole_events_alone_wherever_it_is_cut(
    parts: list[bytes | sse.Event], cut_at: float
) -> None:
    stream = b"".join(p.encode() if isinstance(p, sse.Event) else p for p in parts)
    cut = round(len(stream) * cut_at)
    for received in (stream, stream[:cut]):
        expected, reconnection_time = _expected(parts, len(received))
        assert _whatwg_read(received) == (expected, reconnection_time)
        # Clients that hand over every block see the same events, and no empty one.
        blocks = _blocks(received)
        assert [block.get("data") for block in blocks] == [e.data for e in expected]
        assert [block.get("event", "message") for block in blocks] == [e.type for e in expected]


def test_the_reference_parser_follows_the_standard() -> None:
    # CR-only and CRLF line ends, one optional space, a field without a colon, a comment,
    # an unterminated last event (never dispatched), an id with NUL ignored.
    stream = (
        b"id: 1\r\nevent:x\rdata:  two spaces\ndata\n: note\n\n"
        b"id: a\x00b\ndata: y\n\n"
        b"data: unterminated"
    )
    assert _whatwg_parse(stream) == [
        _Dispatched("x", " two spaces\n", "1"),
        _Dispatched("message", "y", "1"),
    ]
