"""The payload an event travels in from the publisher to every worker, and its decoded form.

The publish script builds `<id>\\n<event name>\\n<data>` (id and name never hold a newline;
the data may). Each worker decodes a payload once and encodes its SSE frame once, then hands
the same bytes to every local listener.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .sse import Event

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


@dataclass(frozen=True, slots=True)
class Delivery:
    """One logged event, ready to be written to any number of streams."""

    id: str
    event: str
    data: str
    position: tuple[int, int] = field(init=False, repr=False, compare=False)
    frame: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", parse_event_id(self.id))
        sse_event = Event(data=self.data, event=self.event or None, id=self.id)
        object.__setattr__(self, "frame", sse_event.encode())

    @property
    def is_finish(self) -> bool:
        """A `finish` event ends every stream of the session."""
        return self.event == FINISH_EVENT


def decode_payload(payload: bytes) -> Delivery:
    """The Delivery inside a pub/sub payload; raises ValueError if it is malformed."""
    parts = payload.split(b"\n", 2)
    if len(parts) != 3:
        raise ValueError("payload lacks id or event name")
    event_id, event, data = (part.decode() for part in parts)
    return Delivery(id=event_id, event=event, data=data)


def decode_log_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
    """The Delivery stored as a stream entry with fields `e` (event) and `d` (data)."""
    return Delivery(
        id=entry_id.decode(),
        event=fields.get(b"e", b"").decode(),
        data=fields.get(b"d", b"").decode(),
    )
