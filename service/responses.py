"""The JSON bodies the HTTP API answers with, defined once as TypedDicts.

Handlers build these dicts and mypy checks each one against its type; the OpenAPI document's
response schemas are generated from the same types (service/openapi.py). Nothing here runs
when a request is answered. The error shape, `errors.ErrorBody`, sits beside the middleware
that renders it. pydantic's `TypedDict` support wants
typing_extensions' class on Python 3.11.
"""

from __future__ import annotations

from typing import Annotated, Literal, NotRequired

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict

from .envelope import EVENT_ID_PATTERN
from .submission import EVENT_NAME_PATTERN

EventId = Annotated[
    str,
    Field(
        pattern=f"^{EVENT_ID_PATTERN}$",
        description="Log position `<milliseconds>-<sequence>`; the SSE `id:`.",
    ),
]
Count = Annotated[int, Field(ge=0)]


@with_config(ConfigDict(extra="forbid"))
class Published(TypedDict):
    """The id the event was logged under."""

    id: EventId


@with_config(ConfigDict(extra="forbid"))
class PublishedIds(TypedDict):
    """The ids the batch's events were logged under, in the order given."""

    ids: list[EventId]


@with_config(ConfigDict(extra="forbid"))
class SessionStatus(TypedDict):
    """A session's state at the moment of asking."""

    sessionId: str
    ttlMs: Annotated[
        int | None, Field(description="Milliseconds until the session expires (null: never).")
    ]
    subscribers: Annotated[
        Count,
        Field(
            description="Workers subscribed to the session's channel (Redis PUBSUB NUMSUB): "
            "each worker subscribes once however many streams it has."
        ),
    ]
    localStreams: Annotated[
        Count, Field(description="Streams of the session open on the worker that answered.")
    ]
    finished: Annotated[
        bool, Field(description="A `finish` event was published in the current run.")
    ]
    lastEventId: Annotated[
        EventId | None, Field(description="The newest logged event id, or null if none.")
    ]


class Alive(TypedDict):
    """The process answers."""

    status: Literal["ok"]


class Failed(TypedDict):
    """Failed beyond repair (the shared subscription stopped on a bug): restart the worker."""

    status: Literal["failed"]
    problems: list[str]


class Ready(TypedDict):
    """Ready; `listeners` is the number of streams open on this worker."""

    status: Literal["ready"]
    listeners: Count


class NotReady(TypedDict):
    """Not ready; `problems` says why."""

    status: Literal["unavailable"]
    problems: list[str]


@with_config(ConfigDict(extra="forbid"))
class DemoToken(TypedDict):
    """The token, when it expires, the leeway the worker allows, and whether this worker
    checks subscriber tokens at all."""

    token: str
    expiresAt: int
    leewayS: Annotated[float, Field(ge=0)]
    subscribeAuth: Literal["open", "token"]


class StreamEvent(TypedDict):
    """One event of a stream, as its fields (`id:`, `event:`, `data:` lines joined by LF,
    `retry:`). Comments (`: connected`, `: ping`) are not events."""

    id: NotRequired[EventId]
    event: NotRequired[Annotated[str, Field(pattern=EVENT_NAME_PATTERN)]]
    data: NotRequired[str]
    retry: NotRequired[Count]
