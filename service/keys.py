"""Every Redis key and channel name the service uses, built from one prefix.

All names of one session carry the hash tag `{<session id>}`, so in a Redis Cluster the
session record, its event log, its run state and its channel live on one shard and every
script touches a single slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis data layout under `prefix`."""

    prefix: str = "sse"

    def session(self, session_id: str) -> str:
        """Hash: `issued`, `epoch` (where fresh connects replay from), `finished` (finish id)."""
        return f"{self.prefix}:{{{session_id}}}:session"

    def log(self, session_id: str) -> str:
        """Capped stream of the session's events; the entry id is the SSE `id:`."""
        return f"{self.prefix}:{{{session_id}}}:log"

    def channel(self, session_id: str) -> str:
        """Pub/sub channel for live delivery of the session's events."""
        return f"{self.prefix}:{{{session_id}}}:events"

    def run(self, session_id: str) -> str:
        """Hash: the demo producer's run state (`state`, `next`, `count`)."""
        return f"{self.prefix}:{{{session_id}}}:run"

    def lease(self, session_id: str) -> str:
        """String with a TTL: the token of the producer currently executing the run."""
        return f"{self.prefix}:{{{session_id}}}:lease"

    def tombstone(self, session_id: str) -> str:
        """String with a TTL, left by a DELETE: a resume gets 204 and no publish re-creates it."""
        return f"{self.prefix}:{{{session_id}}}:deleted"

    def idempotency(self, session_id: str, key: str) -> str:
        """String with a TTL: the ids a publish with the caller's `Idempotency-Key` assigned."""
        return f"{self.prefix}:{{{session_id}}}:published:{key}"

    def session_keys(self, session_id: str) -> tuple[str, ...]:
        """Every key holding the session's state (not its channel): what ending it removes."""
        return (
            self.session(session_id),
            self.log(session_id),
            self.run(session_id),
            self.lease(session_id),
        )

    @property
    def runs(self) -> str:
        """Sorted set of session ids with an unfinished run, scored by next check time (ms)."""
        return f"{self.prefix}:runs"

    @property
    def producer_wake(self) -> str:
        """Channel that tells producers a run is waiting (they also poll `runs`)."""
        return f"{self.prefix}:producer:wake"

    def canary(self, tag: str) -> str:
        """Channel a worker publishes its delivery checks to; the tag picks its cluster slot."""
        return f"{self.prefix}:canary:{{{tag}}}"

    @property
    def hub_control(self) -> str:
        """Channel every worker's hub always holds, so its connection is never unsubscribed."""
        return f"{self.prefix}:hub"
