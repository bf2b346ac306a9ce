"""The Server-Sent Events wire format: pure functions from values to bytes, no I/O.

Field values that would change the meaning of a frame are refused, never rewritten: a CR, LF
or NUL in an event name or id could inject fields, and a silently altered id would break
`Last-Event-ID` resume. Multi-line data is legal and becomes one `data:` line per line.

Only an event ends with a blank line. The standard dispatches nothing for a blank line after
a block without `data:`, but popular clients (`@microsoft/fetch-event-source`, `httpx-sse`)
hand such a block to the application as an empty message. So `retry:` and comment lines are
sent with no blank line of their own: a browser applies `retry:` as soon as it reads the line
and skips comments, and the next event's blank line dispatches that event alone. A stream cut
after such lines leaves no half-built event behind (the standard drops an undispatched block
at the end of a stream), so a resume neither loses nor repeats anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Every line terminator the EventSource parser recognises (CRLF, lone CR, lone LF).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")
_LF, _CR = ord("\n"), ord("\r")


def check_field(name: str, value: bytes) -> None:
    """Raise ValueError unless `value` can stand alone on one field line (no CR, LF or NUL).

    The one check of the rule: the encoder applies it to every name and id it frames, the
    publish API refuses such names earlier with a stricter pattern (submission.py).
    """
    # Byte values, not one-byte strings, with `in`: many times faster on short bytes.
    if _LF in value or _CR in value or 0 in value:
        raise ValueError(f"{name} must not contain CR, LF or NUL")


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the browser's EventSource sees it."""

    data: str
    event: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if self.event is not None:
            check_field("event", self.event.encode())
        if self.id is not None:
            check_field("id", self.id.encode())

    def encode(self) -> bytes:
        """The complete frame, ending with the blank line that dispatches it."""
        return encode_fields(
            self.data.encode(),
            None if self.event is None else self.event.encode(),
            None if self.id is None else self.id.encode(),
        )


def encode_fields(data: bytes, event: bytes | None, event_id: bytes | None) -> bytes:
    """The frame of UTF-8 fields already checked for CR, LF and NUL in `event` and `event_id`.

    Bytes in, bytes out: a worker frames each event straight from what Redis hands over.
    """
    if _LF in data or _CR in data:  # byte values: far faster than b"\n" on short bytes
        body = b"".join([b"data: " + line + b"\n" for line in _LINE_BREAK_BYTES.split(data)])
    else:
        body = b"data: " + data + b"\n"
    if event is not None:
        body = b"event: " + event + b"\n" + body
    if event_id is not None:
        body = b"id: " + event_id + b"\n" + body
    return body + b"\n"


def comment(text: str = "") -> bytes:
    """Comment lines, no blank line: bytes that keep proxies from closing an idle stream."""
    return b"".join(f": {line}\n".encode() for line in _LINE_BREAK.split(text))


def retry(delay_ms: int) -> bytes:
    """The line telling the client how long to wait before reconnecting (no blank line)."""
    if delay_ms < 0:
        raise ValueError("retry delay must not be negative")
    return f"retry: {delay_ms}\n".encode()


PING = comment("ping")
