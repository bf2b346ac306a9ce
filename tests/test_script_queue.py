"""Concurrent script calls share one write: each caller still gets its own reply or error."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.script_queue import ScriptQueue

# Echoes its key and argument; refuses the argument "fail" with an error reply.
ECHO = """
if ARGV[1] == 'fail' then return redis.error_reply('refused ' .. KEYS[1]) end
redis.call('INCR', 'calls')
return {KEYS[1], ARGV[1]}
"""


@pytest.mark.redis
async def test_concurrent_calls_go_out_as_one_batch_each_with_its_own_reply(
    redis_client: redis.Redis,
) -> None:
    queue = ScriptQueue(redis_client, redis_client.register_script(ECHO))
    replies = await asyncio.gather(*(queue(keys=[f"k{n}"], args=[f"a{n}"]) for n in range(50)))
    assert replies == [[f"k{n}".encode(), f"a{n}".encode()] for n in range(50)]
    # The script was not cached yet: one batch found that out, one more ran them all.
    assert queue.batches_sent == 2
    assert await redis_client.get("calls") == b"50"
    await asyncio.gather(*(queue(keys=["k"], args=["b"]) for _ in range(30)))
    assert queue.batches_sent == 3


@pytest.mark.redis
async def test_an_error_reply_reaches_its_own_caller_only(redis_client: redis.Redis) -> None:
    queue = ScriptQueue(redis_client, redis_client.register_script(ECHO))
    results = await asyncio.gather(
        queue(keys=["a"], args=["ok"]),
        queue(keys=["b"], args=["fail"]),
        queue(keys=["c"], args=["ok"]),
        return_exceptions=True,
    )
    assert results[0] == [b"a", b"ok"]
    assert isinstance(results[1], ResponseError)
    assert "refused b" in str(results[1])
    assert results[2] == [b"c", b"ok"]


@pytest.mark.redis
async def test_a_caller_that_gives_up_leaves_the_others_their_replies(
    redis_client: redis.Redis,
) -> None:
    queue = ScriptQueue(redis_client, redis_client.register_script(ECHO))
    await queue(keys=["warm"], args=["up"])  # cached from now on
    waiting = [asyncio.create_task(queue(keys=[f"k{n}"], args=["x"])) for n in range(10)]
    await asyncio.sleep(0)  # all queued, the batch on its way
    waiting[3].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert [reply for n, reply in enumerate(done) if n != 3] == [
        [f"k{n}".encode(), b"x"] for n in range(10) if n != 3
    ]
    # The next call is not held up by the one that gave up.
    async with asyncio.timeout(5):
        assert await queue(keys=["after"], args=["y"]) == [b"after", b"y"]


@pytest.mark.slow  # a second or more: left out of the quick loop
async def test_a_server_out_of_reach_fails_every_caller_of_the_batch() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    queue = ScriptQueue(client, client.register_script(ECHO))
    try:
        results = await asyncio.gather(
            *(queue(keys=[f"k{n}"], args=["x"]) for n in range(5)), return_exceptions=True
        )
    finally:
        await client.aclose()
    assert all(isinstance(result, RedisConnectionError) for result in results), results
