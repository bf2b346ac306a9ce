"""Events submitted to the publish API: parse the JSON body and check every field, no I/O.

A body is one event object or a JSON array of them (a batch). Every field is checked before
anything is published, so a bad batch publishes nothing. A client-chosen `id` is refused
rather than ignored: event ids are positions in the session's log, assigned by Redis and
used for `Last-Event-ID` resume, so a different id than the one asked for would be a silent
rewrite.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .envelope import GAP_EVENT, UNAUTHORIZED_EVENT
from .errors import EventTooLarge, InvalidEvent, MalformedJson

MAX_BATCH_EVENTS = 100
EVENT_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# Checked with fullmatch: `$` alone also matches before a final newline.
_EVENT_NAME = re.compile(EVENT_NAME_PATTERN)
_FIELDS = frozenset({"event", "data", "id"})


@dataclass(frozen=True, slots=True)
class Submission:
    """One event to publish: its name ('' for an unnamed `message` event) and its data text."""

    event: str
    data: str


def parse_body(body: bytes, max_event_bytes: int) -> tuple[list[Submission], bool]:
    """The events in a request body, and whether it was a batch (a JSON array)."""
    value = _load_json(body)
    if isinstance(value, list):
        if not 1 <= len(value) <= MAX_BATCH_EVENTS:
            raise InvalidEvent(f"a batch must hold 1 to {MAX_BATCH_EVENTS} events")
        return [_submission(item, max_event_bytes, f"[{i}]") for i, item in enumerate(value)], True
    return [_submission(value, max_event_bytes, "")], False


def serialize_data(value: Any) -> str:
    """Event data as text: strings as they are, any other JSON value in compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(
            body.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError:
        raise MalformedJson("the body is not valid UTF-8") from None
    except RecursionError:
        raise MalformedJson("the body is nested too deeply") from None
    except ValueError as error:
        # JSONDecodeError, NaN/Infinity, and integers too long to convert.
        raise MalformedJson(f"the body is not valid JSON: {error}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # Python reads 1e999 as infinity, which JSON cannot express: refuse it here, not when the
    # data is written back out.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


def _submission(item: Any, max_event_bytes: int, where: str) -> Submission:
    if not isinstance(item, dict):
        raise InvalidEvent(f"event{where} must be a JSON object with 'data' and optional 'event'")
    if "id" in item:
        raise InvalidEvent(
            f"event{where}: 'id' cannot be chosen by the client; event ids are log positions "
            "assigned on publish and returned in the response"
        )
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise InvalidEvent(f"event{where} has unknown fields: {', '.join(unknown)}")
    if "data" not in item:
        raise InvalidEvent(f"event{where} lacks 'data'")
    event = item.get("event", "")
    if "event" in item and not (isinstance(event, str) and _EVENT_NAME.fullmatch(event)):
        raise InvalidEvent(
            f"event{where}: 'event' must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', ':' "
            "or '-' (omit it for an unnamed event)"
        )
    if event == GAP_EVENT:
        raise InvalidEvent(
            f"event{where}: '{GAP_EVENT}' is reserved: the service sends it when a resuming "
            "client's history is no longer all in the log"
        )
    if event == UNAUTHORIZED_EVENT:
        raise InvalidEvent(
            f"event{where}: '{UNAUTHORIZED_EVENT}' is reserved: the service sends it when a "
            "subscriber's token expires"
        )
    data = serialize_data(item["data"])
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEvent(f"event{where}: 'data' holds an unpaired surrogate") from None
    if size > max_event_bytes:
        raise EventTooLarge(
            f"event{where}: 'data' is {size} bytes, more than the {max_event_bytes} allowed"
        )
    return Submission(event=event, data=data)
