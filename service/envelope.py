"""The payload an event travels in from the publisher to every worker, and its decoded form.

The publish script builds `<id>\\n<event name>\\n<data>` (id and name never hold a newline;
the data may). Each worker decodes a payload once and encodes its SSE frame once, then hands
the same bytes to every local listener.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from .sse import check_field, encode_fields

# The last event of a session's run: streams end after it, and the publish scripts (which
# are handed this name, never spell it) mark the session finished.
FINISH_EVENT = "finish"
# Sent by the service itself when a resuming client's history is no longer all in the log.
GAP_EVENT = "gap"
# Sent by the service itself as the last event of a stream whose subscriber's token expired.
UNAUTHORIZED_EVENT = "unauthorized"
# Event names a publisher may not use, and why: the service's own signals, which a client
# must be able to trust, and the events EventSource itself dispatches on the same object,
# which a listener could not tell from a published one.
RESERVED_EVENTS: Mapping[str, str] = MappingProxyType({
    GAP_EVENT: "the service sends it when a resuming client's history is no longer all "
    "in the log",
    UNAUTHORIZED_EVENT: "the service sends it when a subscriber's token expires",
    "error": "EventSource dispatches its own 'error' event when a connection fails",
    "open": "EventSource dispatches its own 'open' event when a connection opens",
})  # fmt: skip
# The event ids clients may send back: ASCII digits only (`\d` would admit other scripts'
# digits), at most 19 per part so that each part fits the 64-bit numbers of Redis stream ids
# (milliseconds have 13 digits). The OpenAPI description states the same pattern.
_ID_PART = "[0-9]{1,19}"
EVENT_ID_PATTERN = f"{_ID_PART}-{_ID_PART}"
_EVENT_ID = re.compile(f"({_ID_PART})-({_ID_PART})")


def parse_event_id(text: str) -> tuple[int, int]:
    """Order key of a log id `<ms>-<seq>`; raises ValueError for anything else."""
    match = _EVENT_ID.fullmatch(text)
    if match is None:
        raise ValueError(f"not an event id: {text!r}")
    return int(match.group(1)), int(match.group(2))


_EVENT_ID_BYTES = re.compile(f"({_ID_PART})-({_ID_PART})".encode())
_FINISH = FINISH_EVENT.encode()


class Delivery:
    """One logged event, checked and framed once, ready to be written to any number of streams.

    Built straight from the bytes Redis hands over, the frame included: one is built per
    message a worker receives, and decoding to text only to encode it again was a visible
    share of the per-event cost. The name and data are decoded only when asked for.
    """

    __slots__ = ("_data", "_event", "frame", "id", "is_finish", "position")

    def __init__(self, id: str, event: str, data: str) -> None:
        self._init(id.encode(), event.encode(), data.encode())

    @classmethod
    def from_fields(cls, event_id: bytes, event: bytes, data: bytes) -> Delivery:
        """Check and frame one event as stored; raises ValueError if it is malformed."""
        delivery = cls.__new__(cls)
        delivery._init(event_id, event, data)
        return delivery

    def _init(self, event_id: bytes, event: bytes, data: bytes) -> None:
        match = _EVENT_ID_BYTES.fullmatch(event_id)
        if match is None:
            raise ValueError(f"not an event id: {event_id!r}")
        if event:
            check_field("event", event)
        data.decode()  # UTF-8, or UnicodeDecodeError (a ValueError): browsers expect UTF-8
        event.decode()
        self.position = (int(match[1]), int(match[2]))
        self.id = event_id.decode()
        self._event = event
        self._data = data
        self.is_finish = event == _FINISH
        self.frame = encode_fields(data, event or None, event_id)

    @property
    def event(self) -> str:
        """The event name; '' for a plain `message`."""
        return self._event.decode()

    @property
    def data(self) -> str:
        """The event's data (lines joined by the line breaks they were published with)."""
        return self._data.decode()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delivery):
            return NotImplemented
        return (self.id, self._event, self._data) == (other.id, other._event, other._data)

    def __hash__(self) -> int:
        return hash((self.id, self._event, self._data))

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, event={self.event!r}, data={self.data!r})"


def decode_payload(payload: bytes) -> Delivery:
    """The Delivery inside a pub/sub payload; raises ValueError if it is malformed."""
    parts = payload.split(b"\n", 2)
    if len(parts) != 3:
        raise ValueError("payload lacks id or event name")
    return Delivery.from_fields(parts[0], parts[1], parts[2])


def decode_log_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
    """The Delivery stored as a stream entry with fields `e` (event) and `d` (data)."""
    return Delivery.from_fields(entry_id, fields.get(b"e", b""), fields.get(b"d", b""))
