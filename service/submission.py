"""Events submitted to the publish API: parse the JSON body and check every field, no I/O.

A body is one event object or a JSON array of them (a batch). Every field is checked before
anything is published, so a bad batch publishes nothing. A client-chosen `id` is refused
rather than ignored: event ids are positions in the session's log, assigned by Redis and
used for `Last-Event-ID` resume, so a different id than the one asked for would be a silent
rewrite.

The shape of a body is `EventIn` and `Batch`, which both validate it and describe it to the
OpenAPI document (service/openapi.py): pydantic, whose JSON Schema is OpenAPI 3.1's dialect
and whose patterns match the whole text (Rust regex: `$` is the end, where Python's `re`
also matches before a final newline). The JSON itself is read by `json.loads`, stricter
than pydantic's reader in what this API promises (1e999 and NaN refused, integers of any
size kept exactly); pydantic checks the decoded value. Only the publish API validates:
streams and delivery never do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired, Required

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from pydantic_core import ErrorDetails, PydanticCustomError
from typing_extensions import TypedDict

from .envelope import RESERVED_EVENTS
from .errors import EventTooLarge, InvalidEvent, MalformedJson

MAX_BATCH_EVENTS = 100
EVENT_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


def _not_reserved(name: str) -> str:
    reason = RESERVED_EVENTS.get(name)
    if reason is not None:
        raise PydanticCustomError(
            "reserved_event", "'{name}' is reserved: {reason}", {"name": name, "reason": reason}
        )
    return name


EventName = Annotated[
    str,
    Field(
        pattern=EVENT_NAME_PATTERN,
        json_schema_extra={"not": {"enum": list(RESERVED_EVENTS)}},
        description="The event name (EventSource `addEventListener` type). Omit it for an "
        "unnamed `message` event. `finish` ends the session's streams. Reserved: "
        + "; ".join(f"`{name}` ({why})" for name, why in RESERVED_EVENTS.items())
        + ".",
    ),
    AfterValidator(_not_reserved),
]


@with_config(ConfigDict(extra="forbid", strict=True))
class EventIn(TypedDict):
    """One event; an `id` is refused (400): event ids are log positions assigned on publish."""

    event: NotRequired[EventName]
    data: Required[
        Annotated[
            Any,
            Field(
                description="A string is sent as-is (any text; line breaks become several "
                "`data:` lines and arrive as LF). Any other JSON value is sent as compact JSON "
                "text. At most `max_event_bytes` bytes of UTF-8 (see the 413 answer)."
            ),
        ]
    ]


Batch = Annotated[list[EventIn], Field(min_length=1, max_length=MAX_BATCH_EVENTS)]
# What the publish API takes; the OpenAPI document's request body is generated from it.
PublishBody = EventIn | Batch

_FIELDS = EventIn.__required_keys__ | EventIn.__optional_keys__
_EVENT = TypeAdapter(EventIn)
_BATCH = TypeAdapter(Batch)


@dataclass(frozen=True, slots=True)
class Submission:
    """One event to publish: its name ('' for an unnamed `message` event) and its data text."""

    event: str
    data: str


def parse_body(body: bytes, max_event_bytes: int) -> tuple[list[Submission], bool]:
    """The events in a request body, and whether it was a batch (a JSON array)."""
    value = _load_json(body)
    if isinstance(value, list):
        return _batch(value, max_event_bytes), True
    try:
        event = _EVENT.validate_python(value)
    except ValidationError as error:
        raise _refusal(value, error.errors(), "") from None
    return [_submission(event, max_event_bytes, "")], False


def serialize_data(value: Any) -> str:
    """Event data as text: strings as they are, any other JSON value in compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _batch(items: list[Any], max_event_bytes: int) -> list[Submission]:
    try:
        events = _BATCH.validate_python(items)
    except ValidationError as error:
        problems = error.errors()
        if any(not problem["loc"] for problem in problems):
            raise InvalidEvent(f"a batch must hold 1 to {MAX_BATCH_EVENTS} events") from None
        failed = min(int(problem["loc"][0]) for problem in problems)
        # Events before the first invalid one are still checked first, in order, as they
        # would be on their own: the answer names the first event that breaks a rule.
        for i in range(failed):
            _submission(items[i], max_event_bytes, f"[{i}]")
        mine = [problem for problem in problems if problem["loc"][0] == failed]
        raise _refusal(items[failed], [_shifted(p) for p in mine], f"[{failed}]") from None
    return [_submission(event, max_event_bytes, f"[{i}]") for i, event in enumerate(events)]


def _shifted(problem: ErrorDetails) -> ErrorDetails:
    """`problem` located within its event rather than within the batch."""
    return {**problem, "loc": problem["loc"][1:]}


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


def _refusal(item: Any, problems: list[ErrorDetails], where: str) -> InvalidEvent:
    """The one rule an event broke that the answer names, the first in the order below."""
    if not isinstance(item, dict):
        return InvalidEvent(f"event{where} must be a JSON object with 'data' and optional 'event'")
    if "id" in item:
        return InvalidEvent(
            f"event{where}: 'id' cannot be chosen by the client; event ids are log positions "
            "assigned on publish and returned in the response"
        )
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        return InvalidEvent(f"event{where} has unknown fields: {', '.join(unknown)}")
    if "data" not in item:
        return InvalidEvent(f"event{where} lacks 'data'")
    reserved = [p for p in problems if p["type"] == "reserved_event"]
    if reserved:
        return InvalidEvent(f"event{where}: {reserved[0]['msg']}")
    return InvalidEvent(
        f"event{where}: 'event' must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', ':' "
        "or '-' (omit it for an unnamed event)"
    )


def _submission(event: EventIn, max_event_bytes: int, where: str) -> Submission:
    data = serialize_data(event["data"])
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEvent(f"event{where}: 'data' holds an unpaired surrogate") from None
    if size > max_event_bytes:
        raise EventTooLarge(
            f"event{where}: 'data' is {size} bytes, more than the {max_event_bytes} allowed"
        )
    return Submission(event=event.get("event", ""), data=data)
