"""Demo runs waiting for a producer: the index every producer claims from, and its wake-up.

A connection that starts a run only queues it here; whichever producer (in this process or
another) claims it executes it (see producer.py).
"""

from __future__ import annotations

import time

from .keys import Keys
from .redis.connections import RedisClient, pipelines_queue
from .redis.topology import publish_command


async def request_run(redis: RedisClient, keys: Keys, session_id: str) -> None:
    """Make a waiting run visible to every producer and wake them (one round trip if it can).

    A request is scored minus its time in ms: due at once, oldest first, and told apart from
    the entries producers score with a future check time, and from an earlier request.
    """
    request = {session_id: -time.time_ns() // 1_000_000}
    if pipelines_queue(redis):
        pipe = redis.pipeline(transaction=False)
        pipe.zadd(keys.runs, request)
        pipe.publish(keys.producer_wake, session_id)
        await pipe.execute()
        return
    await redis.zadd(keys.runs, request)
    await redis.execute_command(publish_command(redis), keys.producer_wake, session_id)
