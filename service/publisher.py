"""The only writer of session events: log and publish in one atomic step.

Appending to the session's capped log and publishing on its channel happen inside one Lua
script, so a connection that reads the log after its subscription went live can never miss
an event nor see one the log does not have. The log entry id is the event's SSE `id:`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .connections import RedisClient
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


class Publisher:
    """Appends events to session logs and publishes them for live delivery."""

    def __init__(
        self, redis: RedisClient, keys: Keys, session_ttl_s: float, log_maxlen: int
    ) -> None:
        self._keys = keys
        self._ttl_ms = max(1, round(session_ttl_s * 1000))
        self._log_maxlen = log_maxlen
        self._script = redis.register_script(_PUBLISH)
        self._publish_command = publish_command(redis)
        self.events_published = 0

    async def publish(
        self, session_id: str, event: str, data: str, fence: Fence | None = None
    ) -> Published:
        """Log and publish one event (`event` '' for an unnamed one) to every listener."""
        check_field("event", event)
        k = self._keys
        reply = await self._script(
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
        outcome, event_id = (part.decode() if isinstance(part, bytes) else part for part in reply)
        published = Published(PublishOutcome(outcome), event_id)
        if published.outcome is PublishOutcome.PUBLISHED:
            self.events_published += 1
        return published
