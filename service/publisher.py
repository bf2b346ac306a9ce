"""The only writer of session events: log and publish in one atomic step.

Appending to the session's capped log and publishing on its channel happen inside one Lua
script, so a connection that reads the log after its subscription went live can never miss
an event nor see one the log does not have. The log entry id is the event's SSE `id:`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .envelope import FINISH_EVENT
from .keys import Keys
from .redis.connections import RedisClient, pipelines_queue
from .redis.once import run_once
from .redis.topology import publish_command

# KEYS: session, log, run, lease, tombstone.
# ARGV: channel, event, data, ttl_ms, maxlen, token ('' = no fencing), seq, lease_ms,
# publish command (SPUBLISH on a cluster: the channel shares the keys' slot), finish name.
# With a token the caller is a producer run: it must still hold the lease and be at `seq`,
# and its progress advances in the same step as the publish, so no event goes out twice.
# A retry of a publish whose reply was lost finds `next` already at seq + 1: 'done'.
# A fenced publish also answers how many subscribers heard it (the producer's idle signal).
# A session deleted through the API (its tombstone stands) is not re-created: 'deleted'.
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
  if redis.call('EXISTS', KEYS[5]) == 1 then return {'deleted', ''} end
  redis.call('HSET', session, 'issued', '0', 'epoch', '0-0')
  redis.call('PEXPIRE', session, ARGV[4])
end
local id = redis.call('XADD', log, 'MAXLEN', '~', ARGV[5], '*', 'e', event, 'd', data)
redis.call('PEXPIRE', log, redis.call('PTTL', session))
local heard = redis.call(ARGV[9], channel, id .. '\\n' .. event .. '\\n' .. data)
if event == ARGV[10] then redis.call('HSET', session, 'finished', id) end
if token ~= '' then
  local next_seq = redis.call('HINCRBY', run, 'next', 1)
  if next_seq >= tonumber(redis.call('HGET', run, 'count')) then
    redis.call('HSET', run, 'state', 'finished')
    redis.call('DEL', lease)
  else
    redis.call('PEXPIRE', lease, ARGV[8])
  end
  return {'ok', id, heard}
end
return {'ok', id}
"""

# KEYS: session, log, tombstone, and the idempotency record when the caller gave a key.
# ARGV: channel, ttl_ms, maxlen, publish command, require_issued ('1'/'0'), record ttl_ms,
# request digest, finish name, then event name and data for each event of the batch.
# The publish API's script: the whole batch or nothing, in one step. With a record key, the
# first run stores the ids it assigned; a later run with the same key (the caller's retry)
# answers them again instead of publishing, or 'reused' if the request was a different one.
# A finished session takes no more events: every stream has ended, and a fresh connect
# replays its log only up to the finish (a new demo run clears it): 'finished'.
_PUBLISH_BATCH = """
local session, log, tombstone, record = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if record then
  local stored = redis.call('GET', record)
  if stored then
    local space = string.find(stored, ' ', 1, true)
    if string.sub(stored, 1, space - 1) ~= ARGV[7] then return {'reused', ''} end
    return {'replayed', string.sub(stored, space + 1)}
  end
end
if redis.call('EXISTS', session) == 0 then
  if redis.call('EXISTS', tombstone) == 1 then return {'deleted', ''} end
  if ARGV[5] == '1' then return {'unknown', ''} end
  redis.call('HSET', session, 'issued', '0', 'epoch', '0-0')
  redis.call('PEXPIRE', session, ARGV[2])
elseif redis.call('HEXISTS', session, 'finished') == 1 then
  return {'finished', ''}
end
local ids = {}
for i = 9, #ARGV, 2 do
  local event, data = ARGV[i], ARGV[i + 1]
  local id = redis.call('XADD', log, 'MAXLEN', '~', ARGV[3], '*', 'e', event, 'd', data)
  redis.call(ARGV[4], ARGV[1], id .. '\\n' .. event .. '\\n' .. data)
  if event == ARGV[8] then redis.call('HSET', session, 'finished', id) end
  ids[#ids + 1] = id
end
redis.call('PEXPIRE', log, redis.call('PTTL', session))
local joined = table.concat(ids, ' ')
if record then redis.call('SET', record, ARGV[7] .. ' ' .. joined, 'PX', ARGV[6]) end
return {'ok', joined}
"""

# KEYS: session, log, run, lease, tombstone.
# ARGV: channel, data, publish command, ttl_ms, finish name.
# Ends a session in one step: a last `finish` goes out to its live streams, its keys go, and
# a tombstone stays for a session TTL, so that no publish re-creates the session, a resume
# is answered 204, and a repeated DELETE (a caller's retry) is known to have succeeded.
_END_SESSION = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[5]) == 1 then return 'ended' end
  return 'missing'
end
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[5], 'd', ARGV[2])
redis.call(ARGV[3], ARGV[1], id .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('SET', KEYS[5], id, 'PX', ARGV[4])
return 'deleted'
"""


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof that a producer run may publish event number `seq`."""

    token: str
    seq: int
    lease_ms: int


class PublishOutcome(Enum):
    """Whether a publish went out."""

    PUBLISHED = "ok"
    ALREADY_PUBLISHED = "done"
    LEASE_LOST = "lost"
    SESSION_DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Published:
    """The result of one publish: its outcome and, when published, the assigned event id.

    `heard`: for a fenced publish, how many subscribed connections received it.
    """

    outcome: PublishOutcome
    event_id: str
    heard: int = 0


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A caller's key for one publish request, and what identifies the request itself."""

    key: str
    digest: str
    ttl_ms: int


class BatchOutcome(Enum):
    """What the publish API's script did with a batch."""

    PUBLISHED = "ok"
    REPLAYED = "replayed"  # the idempotency key's first request was published: its ids
    KEY_REUSED = "reused"  # the key belongs to a different request
    FINISHED = "finished"  # the session has finished: nothing can reach a stream any more
    DELETED = "deleted"  # the session was deleted (its tombstone stands)
    UNKNOWN_SESSION = "unknown"  # not issued, with require_issued


@dataclass(frozen=True, slots=True)
class PublishedBatch:
    """The result of a batch: its outcome and the event ids (published or replayed)."""

    outcome: BatchOutcome
    ids: list[str]


class SessionEnd(Enum):
    """What ending a session found."""

    DELETED = "deleted"
    ALREADY_DELETED = "ended"  # a repeated delete: its tombstone stands
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """The keys and arguments of one run of the publish script."""

    keys: list[str]
    args: list[str | int]


_Queued = tuple[AsyncScript, ScriptCall, "asyncio.Future[Any]"]


class Publisher:
    """Appends events to session logs and publishes them for live delivery.

    On a single Redis, publishes issued while a batch is on the wire are sent together as
    the next batch: one pipelined round trip (and one pool connection) for any number of
    concurrent publishers, such as a producer running hundreds of sessions. Each publish is
    still its own script run, atomic on its own. On a cluster each publish is its own call
    (see `pipelines_queue`).

    Nothing here is ever re-sent (see `service/redis/once.py`): a publish whose reply did not come
    fails with `OutcomeUnknown`. The producer's publishes are fenced, so it simply retries;
    the publish API hands the question to its caller, with an idempotency key to retry by.
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
        self._batch_script = redis.register_script(_PUBLISH_BATCH)
        self._end_script = redis.register_script(_END_SESSION)
        self._publish_command = publish_command(redis)
        self._batching = pipelines_queue(redis)
        self._queued: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self.events_published = 0
        self.batches_sent = 0

    def script_call(
        self, session_id: str, event: str, data: str, fence: Fence | None = None
    ) -> ScriptCall:
        """What publishing `event` (a name checked where it entered) runs in Redis."""
        k = self._keys
        return ScriptCall(
            keys=[
                k.session(session_id),
                k.log(session_id),
                k.run(session_id),
                k.lease(session_id),
                k.tombstone(session_id),
            ],
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
                FINISH_EVENT,
            ],
        )

    async def publish(
        self, session_id: str, event: str, data: str, fence: Fence | None = None
    ) -> Published:
        """Log and publish one event (`event` '' for an unnamed one) to every listener."""
        call = self.script_call(session_id, event, data, fence)
        reply = await self._run(self._script, call)
        parts = [part.decode() if isinstance(part, bytes) else part for part in reply]
        published = Published(
            PublishOutcome(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else 0
        )
        if published.outcome is PublishOutcome.PUBLISHED:
            self.events_published += 1
        return published

    async def publish_batch(
        self,
        session_id: str,
        events: Sequence[tuple[str, str]],
        *,
        require_issued: bool,
        record: IdempotencyRecord | None = None,
    ) -> PublishedBatch:
        """Log and publish `events` (name, data) all or none, in one step.

        With a `record`, a repeated request (same key and digest) answers the ids of the
        first instead of publishing again.
        """
        if not events:
            raise ValueError("a batch holds at least one event")
        k = self._keys
        keys = [k.session(session_id), k.log(session_id), k.tombstone(session_id)]
        if record is not None:
            keys.append(k.idempotency(session_id, record.key))
        args: list[str | int] = [
            k.channel(session_id),
            self._ttl_ms,
            self._log_maxlen,
            self._publish_command,
            int(require_issued),
            record.ttl_ms if record else 0,
            record.digest if record else "",
            FINISH_EVENT,
        ]
        for event, data in events:
            args.extend((event, data))
        reply = await self._run(self._batch_script, ScriptCall(keys, args))
        outcome, ids = (part.decode() if isinstance(part, bytes) else part for part in reply)
        batch = PublishedBatch(BatchOutcome(outcome), ids.split(" ") if ids else [])
        if batch.outcome is BatchOutcome.PUBLISHED:
            self.events_published += len(batch.ids)
        return batch

    async def end_session(self, session_id: str, data: str) -> SessionEnd:
        """Send a last `finish` (with `data`) to the session's streams and remove the session."""
        k = self._keys
        call = ScriptCall(
            keys=[*k.session_keys(session_id), k.tombstone(session_id)],
            args=[k.channel(session_id), data, self._publish_command, self._ttl_ms, FINISH_EVENT],
        )
        reply = await self._run(self._end_script, call)
        return SessionEnd(reply.decode() if isinstance(reply, bytes) else reply)

    async def _run(self, script: AsyncScript, call: ScriptCall) -> Any:
        if self._batching:
            return await self._enqueue(script, call)
        reply = (await self._send_once([(script, call)]))[0]
        if isinstance(reply, NoScriptError):
            await self._redis.script_load(script.script)
            reply = (await self._send_once([(script, call)]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _enqueue(self, script: AsyncScript, call: ScriptCall) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((script, call, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued(), name="publisher")
        return future

    async def _send_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                with contextlib.suppress(Exception):  # its callers were handed the error
                    await self._send_loading_scripts(batch)
        except BaseException as error:  # cancelled: nothing queued may wait forever
            _fail_all(self._queued, error)
            self._queued = []
            raise
        finally:
            self._sender = None

    async def _send_loading_scripts(self, batch: list[_Queued]) -> None:
        unknown = await self._send_batch(batch)
        if unknown:
            # The server has not cached a script (first use, or after a restart): load it
            # once and resend those calls (they did not run), before anything queued since.
            try:
                for script in {id(script): script for script, _, _ in unknown}.values():
                    await self._redis.script_load(script.script)
            except BaseException as error:
                _fail_all(unknown, error)
                raise
            _fail_all(await self._send_batch(unknown), NoScriptError("script not cached"))

    async def _send_batch(self, batch: list[_Queued]) -> list[_Queued]:
        """Run the batch's scripts in one write and hand each caller its own reply.

        Returns the calls the server refused because it does not have the script.
        """
        self.batches_sent += 1
        try:
            replies = await self._send_once([(script, call) for script, call, _ in batch])
        except BaseException as error:
            _fail_all(batch, error)
            raise
        unknown = []
        for queued, reply in zip(batch, replies, strict=True):
            future = queued[2]
            if isinstance(reply, NoScriptError):
                unknown.append(queued)
            elif isinstance(reply, Exception):
                _fail(future, reply)
            elif not future.done():
                future.set_result(reply)
        return unknown

    async def _send_once(self, calls: list[tuple[AsyncScript, ScriptCall]]) -> list[Any]:
        commands = [
            ("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)
            for script, call in calls
        ]
        return await run_once(self._redis, commands, key=calls[0][1].keys[0])


def _fail_all(queued: list[_Queued], error: BaseException) -> None:
    for _, _, future in queued:
        _fail(future, error)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)
