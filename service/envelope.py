"""The payload an event travels in from the publisher to every worker, and its decoded form.

The publish script builds `<id>\\n<event name>\\n<data>` (id and name never hold a newline;
the data may). Each worker decodes a payload once and encodes its SSE frame once, then hands
the same bytes to every local listener.
"""

from __future__ import annotations

import re

from .sse import check_field, encode_fields

FINISH_EVENT = "finish"
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


class Delivery:
    """One logged event, ready to be written to any number of streams.

    A plain slotted class rather than a frozen dataclass: one is built per message a worker
    receives, and the dataclass machinery was a visible share of the per-event cost.
    """

    __slots__ = ("data", "event", "frame", "id", "position")

    def __init__(self, id: str, event: str, data: str) -> None:
        # The id is checked by parsing it; a name that parses holds no CR, LF or NUL.
        self.position = parse_event_id(id)
        self.id = id
        self.event = check_field("event", event)
        self.data = data
        self.frame = encode_fields(data, event or None, id)

    @property
    def is_finish(self) -> bool:
        """A `finish` event ends every stream of the session."""
        return self.event == FINISH_EVENT

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delivery):
            return NotImplemented
        return (self.id, self.event, self.data) == (other.id, other.event, other.data)

    def __hash__(self) -> int:
        return hash((self.id, self.event, self.data))

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, event={self.event!r}, data={self.data!r})"


def decode_payload(payload: bytes) -> Delivery:
    """The Delivery inside a pub/sub payload; raises ValueError if it is malformed."""
    parts = payload.split(b"\n", 2)
    if len(parts) != 3:
        raise ValueError("payload lacks id or event name")
    return Delivery(parts[0].decode(), parts[1].decode(), parts[2].decode())


def decode_log_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
    """The Delivery stored as a stream entry with fields `e` (event) and `d` (data)."""
    return Delivery(
        id=entry_id.decode(),
        event=fields.get(b"e", b"").decode(),
        data=fields.get(b"d", b"").decode(),
    )
