"""The only writer of session events: log and publish in one atomic step.

Appending to the session's capped log and publishing on its channel happen inside one Lua
script, so a connection that reads the log after its subscription went live can never miss
an event nor see one the log does not have. The log entry id is the event's SSE `id:`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis.exceptions import NoScriptError

from .connections import RedisClient, pipelines_queue
from .keys import Keys
from .sse import check_field
from .topology import publish_command

# KEYS: session, log, run, lease.
# ARGV: channel, event, data, ttl_ms, maxlen, token ('' = no fencing), seq, lease_ms,
# publish command (SPUBLISH on a cluster: the channel shares the keys' slot).
# With a token the caller is a producer run: it must still hold the lease and be at `seq`,
# and its progress advances in the same step as the publish, so no event goes out twice.
# A retry of a publish whose reply was lost finds `next` already at seq + 1: 'done'.
_PUBLISH = """
local session, log, run, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, event, data = ARGV[1], ARGV[2], ARGV[3]
local token = ARGV[6]
if token ~= '' then
  if redis.call('GET', lease) ~= token then return {'lost', ''} end
  local next_seq = redis.call('HGET', run, 'next')
  if next_seq == tostring(tonumber(ARGV[7]) + 1) then return {'done', ''} end
  if next_seq ~= ARGV[7] then return {'lost', ''} end
end
if redis.call('EXISTS', session) == 0 then
  redis.call('HSET', session, 'issued', '0', 'epoch', '0-0')
  redis.call('PEXPIRE', session, ARGV[4])
end
local id = redis.call('XADD', log, 'MAXLEN', '~', ARGV[5], '*', 'e', event, 'd', data)
redis.call('PEXPIRE', log, redis.call('PTTL', session))
redis.call(ARGV[9], channel, id .. '\\n' .. event .. '\\n' .. data)
if event == 'finish' then redis.call('HSET', session, 'finished', id) end
if token ~= '' then
  local next_seq = redis.call('HINCRBY', run, 'next', 1)
  if next_seq >= tonumber(redis.call('HGET', run, 'count')) then
    redis.call('HSET', run, 'state', 'finished')
    redis.call('DEL', lease)
  else
    redis.call('PEXPIRE', lease, ARGV[8])
  end
end
return {'ok', id}
"""


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof that a producer run may publish event number `seq`."""

    token: str
    seq: int
    lease_ms: int


class PublishOutcome(Enum):
    """Whether a fenced publish went out."""

    PUBLISHED = "ok"
    ALREADY_PUBLISHED = "done"
    LEASE_LOST = "lost"


@dataclass(frozen=True, slots=True)
class Published:
    """The result of one publish: its outcome and, when published, the assigned event id."""

    outcome: PublishOutcome
    event_id: str


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """The keys and arguments of one run of the publish script."""

    keys: list[str]
    args: list[str | int]


_Queued = tuple[ScriptCall, "asyncio.Future[Any]"]


class Publisher:
    """Appends events to session logs and publishes them for live delivery.

    On a single Redis, publishes issued while a batch is on the wire are sent together as
    the next batch: one pipelined round trip (and one pool connection) for any number of
    concurrent publishers, such as a producer running hundreds of sessions. Each publish is
    still its own script run, atomic on its own. On a cluster each publish is its own call
    (see `pipelines_queue`).
    """

    SCRIPT = _PUBLISH

    def __init__(
        self, redis: RedisClient, keys: Keys, session_ttl_s: float, log_maxlen: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = max(1, round(session_ttl_s * 1000))
        self._log_maxlen = log_maxlen
        self._script = redis.register_script(_PUBLISH)
        self._publish_command = publish_command(redis)
        self._batching = pipelines_queue(redis)
        self._queued: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self.events_published = 0
        self.batches_sent = 0

    def script_call(
        self, session_id: str, event: str, data: str, fence: Fence | None = None
    ) -> ScriptCall:
        """What publishing `event` runs in Redis; raises ValueError for a bad event name."""
        check_field("event", event)
        k = self._keys
        return ScriptCall(
            keys=[k.session(session_id), k.log(session_id), k.run(session_id), k.lease(session_id)],
            args=[
                k.channel(session_id),
                event,
                data,
                self._ttl_ms,
                self._log_maxlen,
                fence.token if fence else "",
                fence.seq if fence else 0,
                fence.lease_ms if fence else 0,
                self._publish_command,
            ],
        )

    async def publish(
        self, session_id: str, event: str, data: str, fence: Fence | None = None
    ) -> Published:
        """Log and publish one event (`event` '' for an unnamed one) to every listener."""
        call = self.script_call(session_id, event, data, fence)
        if self._batching:
            reply = await self._enqueue(call)
        else:
            reply = await self._script(keys=call.keys, args=call.args)
        outcome, event_id = (part.decode() if isinstance(part, bytes) else part for part in reply)
        published = Published(PublishOutcome(outcome), event_id)
        if published.outcome is PublishOutcome.PUBLISHED:
            self.events_published += 1
        return published

    def _enqueue(self, call: ScriptCall) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((call, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued(), name="publisher")
        return future

    async def _send_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                with contextlib.suppress(Exception):  # its callers were handed the error
                    await self._send_loading_script(batch)
        except BaseException as error:  # cancelled: nothing queued may wait forever
            _fail_all(self._queued, error)
            self._queued = []
            raise
        finally:
            self._sender = None

    async def _send_loading_script(self, batch: list[_Queued]) -> None:
        unknown = await self._send_batch(batch)
        if unknown:
            # The server has not cached the script (first use, or after a restart): load
            # it once and resend those calls, before anything queued since.
            try:
                await self._redis.script_load(_PUBLISH)
            except BaseException as error:
                _fail_all(unknown, error)
                raise
            _fail_all(await self._send_batch(unknown), NoScriptError("script not cached"))

    async def _send_batch(self, batch: list[_Queued]) -> list[_Queued]:
        """Run the batch's scripts in one pipeline and hand each caller its own reply.

        Returns the calls the server refused because it does not have the script.
        """
        self.batches_sent += 1
        pipe = self._redis.pipeline(transaction=False)
        for call, _ in batch:
            pipe.evalsha(self._script.sha, len(call.keys), *call.keys, *call.args)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as error:
            _fail_all(batch, error)
            raise
        unknown = []
        for (call, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                unknown.append((call, future))
            elif isinstance(reply, Exception):
                _fail(future, reply)
            elif not future.done():
                future.set_result(reply)
        return unknown


def _fail_all(queued: list[_Queued], error: BaseException) -> None:
    for _, future in queued:
        _fail(future, error)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)
