"""Session ids and their records in Redis: issue, attach a connection, read the event log."""

from __future__ import annotations

import asyncio
import math
import re
import secrets
from dataclasses import dataclass
from enum import Enum

from . import script_queue
from .envelope import Delivery, decode_log_entry
from .keys import Keys
from .redis.connections import RedisClient
from .replies import reply_text

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# 22 independent base-62 digits from the system CSPRNG: 22 * log2(62) = 130.99 bits.
SESSION_ID_LENGTH = 22
SESSION_ID_BITS = round(SESSION_ID_LENGTH * math.log2(len(BASE62)))
SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_session_id() -> str:
    """A fresh, unguessable base-62 session id."""
    return "".join(secrets.choice(BASE62) for _ in range(SESSION_ID_LENGTH))


def is_valid_session_id(text: str) -> bool:
    """Ids the service accepts from clients: 1-64 of `[A-Za-z0-9_-]`."""
    return SESSION_ID_PATTERN.fullmatch(text) is not None


class AttachStatus(Enum):
    """What `attach` found."""

    ATTACHED = "attached"
    UNKNOWN = "unknown"  # a fresh connect to a session not issued, with require_issued
    GONE = "gone"  # a resume of a session that no longer exists: nothing will ever come


@dataclass(frozen=True, slots=True)
class Attachment:
    """A connection's view of its session at the moment its subscription became live."""

    status: AttachStatus
    replay_after: str
    finished_id: str | None
    ttl_ms: int
    run_needs_producer: bool
    # The log's first page from `replay_after` on, that id included (when still logged):
    # read with the attach, it saves the stream its first read.
    first_page: tuple[Delivery, ...] = ()


# KEYS: session, log, run, lease, tombstone.
# ARGV: ttl_ms, require_issued, last_id ('' = fresh), start_runs, count, page_count.
# A resume (a last id) of a session that no longer exists (expired, deleted, lost with Redis'
# data) is 'gone': it is never re-created, so the client can be told to stop. A fresh connect
# registers the session as the original demo does (a deleted one too), refreshes its TTL, and
# on a session without an active run (new, finished or parked) starts one: the epoch moves
# to the log's newest id so the new run replays from there. A resume of a run the producer
# parked for want of listeners makes it active again, to go on where it stopped. An attached
# connection also gets the log's first page from its replay point on, that id included, so
# that the stream can tell whether the history still reaches back to it.
_ATTACH = """
local session, log, run = KEYS[1], KEYS[2], KEYS[3]
local ttl = tonumber(ARGV[1])
local fresh = ARGV[3] == ''
if redis.call('EXISTS', session) == 0 then
  if not fresh then return {'gone', '', '', 0, 0, {}} end
  if ARGV[2] == '1' then return {'unknown', '', '', 0, 0, {}} end
  redis.call('DEL', KEYS[5])
  redis.call('HSET', session, 'issued', '0', 'epoch', '0-0')
  redis.call('PEXPIRE', session, ttl)
end
local needs_producer = 0
if fresh then
  redis.call('PEXPIRE', session, ttl)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PEXPIRE', run, ttl)
  if ARGV[4] == '1' then
    local state = redis.call('HGET', run, 'state')
    if state ~= 'active' then
      local newest = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
      local epoch = '0-0'
      if #newest > 0 then epoch = newest[1][1] end
      redis.call('HSET', session, 'epoch', epoch)
      redis.call('HDEL', session, 'finished')
      redis.call('DEL', run)
      redis.call('HSET', run, 'state', 'active', 'next', 0, 'count', ARGV[5])
      redis.call('PEXPIRE', run, ttl)
      needs_producer = 1
    elseif redis.call('EXISTS', KEYS[4]) == 0 then
      needs_producer = 1
    end
  end
elseif ARGV[4] == '1' and redis.call('HGET', run, 'state') == 'parked' then
  redis.call('HSET', run, 'state', 'active')
  needs_producer = 1
end
local fields = redis.call('HMGET', session, 'epoch', 'finished')
local after = ARGV[3]
if fresh then after = fields[1] or '0-0' end
local page = redis.call('XRANGE', log, after, '+', 'COUNT', ARGV[6])
return {'attached', after, fields[2] or '', redis.call('PTTL', session), needs_producer, page}
"""

# KEYS: session. ARGV: ttl_ms.
_ISSUE = """
redis.call('HSET', KEYS[1], 'issued', '1', 'epoch', '0-0')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


class SessionStore:
    """Session records, kept under `Keys`, each expiring after its TTL."""

    def __init__(self, redis: RedisClient, keys: Keys, ttl_s: float, replay_reads: int = 1) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._replay_slots = asyncio.Semaphore(replay_reads)
        # Concurrent connects' attaches share one write (see script_queue.py).
        self._attach = script_queue.ScriptQueue(redis, redis.register_script(_ATTACH))
        self._issue = redis.register_script(_ISSUE)

    async def issue(self) -> str:
        """Create and record a new session id."""
        session_id = new_session_id()
        await self._issue(keys=[self._keys.session(session_id)], args=[self._ttl_ms])
        return session_id

    async def attach(
        self,
        session_id: str,
        last_event_id: str | None,
        *,
        require_issued: bool,
        start_run_with: int | None,
        page_count: int,
    ) -> Attachment:
        """Register a connection; a fresh one may start a demo run of `start_run_with` events.

        The attachment holds up to `page_count` logged events from its replay point on.
        """
        k = self._keys
        reply = await self._attach(
            keys=[
                k.session(session_id),
                k.log(session_id),
                k.run(session_id),
                k.lease(session_id),
                k.tombstone(session_id),
            ],
            args=[
                self._ttl_ms,
                int(require_issued),
                last_event_id or "",
                int(start_run_with is not None),
                start_run_with or 0,
                page_count,
            ],
        )
        status, after, finished, ttl_ms, needs_producer, page = reply
        return Attachment(
            status=AttachStatus(reply_text(status)),
            replay_after=reply_text(after),
            finished_id=reply_text(finished) or None,
            ttl_ms=int(ttl_ms),
            run_needs_producer=bool(needs_producer),
            first_page=tuple(
                decode_log_entry(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)))
                for entry_id, fields in page
            ),
        )

    async def exists(self, session_id: str) -> bool:
        """Whether the session still exists (not expired, deleted or lost)."""
        return bool(await self._redis.exists(self._keys.session(session_id)))

    async def ttl_ms(self, session_id: str) -> int:
        """Milliseconds the session has left; 0 or less when it is gone."""
        return int(await self._redis.pttl(self._keys.session(session_id)))

    async def read_page(self, session_id: str, start: str, count: int) -> list[Delivery]:
        """Up to `count` logged events from `start` on (an id, included, or `(id`, excluded).

        A stream's first page comes with its attach; the pages after it, and those of a
        resync, are read here. Reads of all replays of this worker queue for `replay_reads`
        slots, so a storm of resumes of a long log never holds more than that many Redis
        connections: attaches, publishes and TTL checks always find one. A slot is held for
        one read, never across the writes to a client.
        """
        async with self._replay_slots:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(
                self._keys.log(session_id), min=start, max="+", count=count
            )  # type: ignore[assignment]
        return [decode_log_entry(entry_id, fields) for entry_id, fields in entries]
