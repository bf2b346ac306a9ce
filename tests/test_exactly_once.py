"""Publishing through a stalled Redis: every accepted event is logged exactly once.

A Lua script that keeps Redis busy for longer than the command timeout is the stall: commands
sent meanwhile are neither refused nor lost, they run when the script ends. A client that
re-sent them after its timeout would publish them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from service.redis.connections import RedisClient

from app_clients import MakeSettings, StartClient
from redis_state import RedisTarget, logged_data, logged_ids

pytestmark = pytest.mark.redis

TOKEN = "exactly-once-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 0.5
STALL_S = 1.2

# Busy for ARGV[1] milliseconds: nothing else runs on the server meanwhile.
_BUSY = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local stop = now_ms() + tonumber(ARGV[1])
while now_ms() < stop do end
return 1
"""


async def stall(url: str, seconds: float) -> None:
    """Keep the server busy for `seconds`, from a client of its own."""
    client = redis.Redis.from_url(url, socket_timeout=seconds + 10)
    try:
        await client.eval(_BUSY, 0, round(seconds * 1000))
    finally:
        await client.aclose()


async def post(http: Any, session_id: str, body: Any, key: str | None = None) -> Any:
    headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
    return await http.post(f"/sse/sessions/{session_id}/events", json=body, headers=headers)


async def publish_through_a_stall(
    http: Any, url: str, session_id: str, count: int, *, keys: bool, batch: int = 0
) -> list[tuple[int, Any]]:
    """POST `count` requests at ~40/s while Redis stalls once; each answer with its status.

    Request `n` publishes `event n`, or with `batch` a batch of events `n.0`, `n.1`, ...
    """

    async def one(n: int) -> tuple[int, Any]:
        body: Any = {"data": f"event {n}"}
        if batch:
            body = [{"data": f"event {n}.{k}"} for k in range(batch)]
        response = await post(http, session_id, body, f"k{n}" if keys else None)
        return response.status, await response.json()

    stalling: asyncio.Task[None] | None = None
    sent = []
    for n in range(count):
        if n == count // 4:
            stalling = asyncio.create_task(stall(url, STALL_S))
        sent.append(asyncio.create_task(one(n)))
        await asyncio.sleep(0.025)  # a steady publish load, not a synchronisation
    async with asyncio.timeout(30):
        answers = await asyncio.gather(*sent)
        if stalling is not None:
            await stalling
    return answers


async def test_a_stall_longer_than_the_timeout_never_publishes_an_accepted_event_twice(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(
        redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False, redis_timeout_s=TIMEOUT_S
    )
    http = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    answers = await publish_through_a_stall(http, redis_url, "stalled", 160, keys=False)

    logged = await logged_data(redis_client, "stalled")
    copies = Counter(data for _, data in logged)
    assert [data for data, n in copies.items() if n > 1] == []
    accepted = [body["id"] for status, body in answers if status == 202]
    assert len(accepted) > 0
    assert set(accepted) <= {entry_id for entry_id, _ in logged}
    refused = [body["error"] for status, body in answers if status != 202]
    assert set(refused) <= {"outcome_unknown", "unavailable"}
    # The stall was real: some publishes could not be confirmed in time.
    assert refused


async def test_a_batch_is_published_whole_or_not_at_all_through_a_stall(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(
        redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False, redis_timeout_s=TIMEOUT_S
    )
    http = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    answers = await publish_through_a_stall(http, redis_url, "batches", 120, keys=False, batch=5)

    logged = Counter(
        data.rpartition(".")[0] for _, data in await logged_data(redis_client, "batches")
    )
    assert set(logged.values()) <= {5}  # no batch in part, none twice
    for n, (status, _) in enumerate(answers):
        if status == 202:
            assert logged[f"event {n}"] == 5
    assert any(status != 202 for status, _ in answers)


async def test_retrying_with_the_idempotency_key_after_a_stall_publishes_each_event_once(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(
        redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False, redis_timeout_s=TIMEOUT_S
    )
    http = await start_client(settings, connector=aiohttp.TCPConnector(limit=0))
    count = 120
    answers = await publish_through_a_stall(http, redis_url, "retried", count, keys=True)
    assert any(status == 503 for status, _ in answers)

    ids: dict[int, str] = {}
    for n, answer in enumerate(answers):
        status, body = answer
        for _ in range(20):  # the caller retries until the service gives an answer
            if status == 202:
                ids[n] = body["id"]
                break
            assert body["error"] in ("outcome_unknown", "unavailable"), body
            await asyncio.sleep(0.1)
            response = await post(http, "retried", {"data": f"event {n}"}, f"k{n}")
            status, body = response.status, await response.json()
    assert sorted(ids) == list(range(count))

    logged = await logged_data(redis_client, "retried")
    assert sorted(data for _, data in logged) == sorted(f"event {n}" for n in range(count))
    by_data = {data: entry_id for entry_id, data in logged}
    assert all(by_data[f"event {n}"] == ids[n] for n in range(count))


async def test_a_retried_request_gets_the_original_answer_and_publishes_nothing(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_target: RedisTarget,
    target_client: RedisClient,
) -> None:
    settings = make_settings(**redis_target.settings, publish_tokens=[TOKEN], demo_runs=False)
    http = await start_client(settings)
    batch = [{"data": "one"}, {"event": "note", "data": "two"}]
    first = await post(http, "again", batch, "order-42")
    assert first.status == 202
    body = await first.json()
    again = await post(http, "again", batch, "order-42")
    assert again.status == 202
    assert await again.json() == body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await logged_ids(target_client, "again") == body["ids"]
    # The same key with another body is a client error, not a silent replay.
    other = await post(http, "again", [{"data": "three"}], "order-42")
    assert other.status == 422
    assert (await other.json())["error"] == "idempotency_key_reused"
    # Keys are per session.
    elsewhere = await post(http, "elsewhere", batch, "order-42")
    assert elsewhere.status == 202


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "ü", "a\tb"])
async def test_a_malformed_idempotency_key_is_refused(
    start_client: StartClient,
    make_settings: MakeSettings,
    redis_url: str,
    key: str,
) -> None:
    settings = make_settings(redis_url=redis_url, publish_tokens=[TOKEN], demo_runs=False)
    http = await start_client(settings)
    with contextlib.suppress(ValueError):  # aiohttp refuses some values itself
        response = await http.post(
            "/sse/sessions/s/events",
            json={"data": "x"},
            headers={**AUTH, "Idempotency-Key": key},
        )
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_parameter"
