"""The test parser follows the EventSource rules the other tests rely on."""

from sse_reader import SSEParser


def test_dispatches_on_blank_line_with_last_id_and_name() -> None:
    parser = SSEParser()
    events = parser.feed("id: 1-0\nevent: finish\ndata: a\ndata: b\n\n")
    assert [(e.id, e.event, e.data) for e in events] == [("1-0", "finish", "a\nb")]


def test_comments_and_retry_are_not_events() -> None:
    parser = SSEParser()
    assert parser.feed("retry: 700\n\n: ping\n\n") == []
    assert parser.retry_ms == 700
    assert parser.comments == ["ping"]


def test_id_persists_and_unnamed_events_are_messages() -> None:
    parser = SSEParser()
    events = parser.feed("id: 5-0\ndata: x\n\ndata: y\n\n")
    assert [(e.id, e.event) for e in events] == [("5-0", "message"), ("5-0", "message")]


def test_an_event_without_data_is_not_dispatched() -> None:
    assert SSEParser().feed("event: nothing\n\n") == []
