"""Session ids and their records: alphabet, entropy, validation, TTL, the attach's first page."""

import math
from typing import Any

import fakeredis
import pytest

from service.envelope import Delivery
from service.keys import Keys
from service.redis.connections import RedisClient
from service.sessions import (
    BASE62,
    SESSION_ID_LENGTH,
    Attachment,
    AttachStatus,
    SessionStore,
    is_valid_session_id,
    new_session_id,
)


def test_ids_are_base62_and_carry_at_least_128_bits() -> None:
    assert SESSION_ID_LENGTH * math.log2(62) >= 128
    ids = {new_session_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(len(i) == SESSION_ID_LENGTH and set(i) <= set(BASE62) for i in ids)
    # Every digit position varies: no serial counter hiding in the id.
    for position in range(SESSION_ID_LENGTH):
        assert len({i[position] for i in ids}) > 30


@pytest.mark.parametrize("good", ["1234", "a", "A-b_9", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert is_valid_session_id(good)


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "a\nb", "a/b", "é", "a{b}", "a:b"])
def test_invalid_ids(bad: str) -> None:
    assert not is_valid_session_id(bad)


@pytest.fixture
def store() -> tuple[SessionStore, fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    return SessionStore(client, Keys("t"), ttl_s=5.0), client


async def test_issue_stores_the_id_with_its_ttl(
    store: tuple[SessionStore, fakeredis.FakeAsyncRedis],
) -> None:
    sessions, client = store
    session_id = await sessions.issue()
    assert await client.hget(Keys("t").session(session_id), "issued") == b"1"
    assert 4000 < await sessions.ttl_ms(session_id) <= 5000


async def test_unknown_ids_are_registered_unless_issuing_is_required(
    store: tuple[SessionStore, fakeredis.FakeAsyncRedis],
) -> None:
    sessions, _ = store
    refused = await sessions.attach(
        "1234", None, require_issued=True, start_run_with=None, page_count=16
    )
    assert refused.status is AttachStatus.UNKNOWN
    accepted = await sessions.attach(
        "1234", None, require_issued=False, start_run_with=None, page_count=16
    )
    assert accepted.status is AttachStatus.ATTACHED
    assert accepted.ttl_ms > 4000
    again = await sessions.attach(
        "1234", None, require_issued=True, start_run_with=None, page_count=16
    )
    assert again.status is AttachStatus.ATTACHED


async def test_a_run_starts_once_until_it_finishes(
    store: tuple[SessionStore, fakeredis.FakeAsyncRedis],
) -> None:
    sessions, client = store
    first = await sessions.attach("s", None, require_issued=False, start_run_with=3, page_count=16)
    assert first.run_needs_producer
    # The run is waiting with no producer lease yet: a second connect asks again (harmless).
    await client.set(Keys("t").lease("s"), "someone")
    second = await sessions.attach("s", None, require_issued=False, start_run_with=3, page_count=16)
    assert not second.run_needs_producer
    await client.hset(Keys("t").run("s"), "state", "finished")
    third = await sessions.attach("s", None, require_issued=False, start_run_with=3, page_count=16)
    assert third.run_needs_producer


async def test_a_resume_wakes_a_parked_run_and_a_fresh_connect_starts_a_new_one(
    store: tuple[SessionStore, fakeredis.FakeAsyncRedis],
) -> None:
    sessions, client = store
    run = Keys("t").run("p")
    await sessions.attach("p", None, require_issued=False, start_run_with=5, page_count=16)
    await client.hset(run, mapping={"state": "parked", "next": 3})
    resumed = await sessions.attach(
        "p", "1-0", require_issued=False, start_run_with=5, page_count=16
    )
    assert resumed.run_needs_producer
    assert await client.hget(run, "state") == b"active"
    assert await client.hget(run, "next") == b"3"  # it goes on where it stopped
    await client.hset(run, "state", "parked")
    fresh = await sessions.attach("p", None, require_issued=False, start_run_with=5, page_count=16)
    assert fresh.run_needs_producer
    assert await client.hget(run, "next") == b"0"  # a new run
    # A resume of a session that no longer exists is gone, and not re-created.
    gone = await sessions.attach(
        "never", "1-0", require_issued=False, start_run_with=5, page_count=16
    )
    assert gone.status is AttachStatus.GONE
    assert await client.exists(Keys("t").session("never")) == 0


async def assert_first_pages(client: RedisClient) -> None:
    """The attach returns the log's first page from its replay point on, that id included."""
    keys = Keys("t")
    sessions = SessionStore(client, keys, ttl_s=5.0)
    for n in range(1, 21):
        name, data = ("finish", "last\nline") if n == 20 else ("", f"m{n}")
        await client.xadd(keys.log("f"), {"e": name, "d": data}, id=f"{n}-0")

    async def attach(last_event_id: str | None, **kwargs: Any) -> Attachment:
        options: dict[str, Any] = {"require_issued": False, "start_run_with": None, **kwargs}
        return await sessions.attach("f", last_event_id, page_count=16, **options)

    fresh = await attach(None)
    assert fresh.replay_after == "0-0"
    assert [d.id for d in fresh.first_page] == [f"{n}-0" for n in range(1, 17)]
    assert fresh.first_page[0] == Delivery("1-0", "", "m1")
    resumed = await attach("15-0")
    assert [d.id for d in resumed.first_page] == [f"{n}-0" for n in range(15, 21)]
    assert resumed.first_page[-1] == Delivery("20-0", "finish", "last\nline")
    # A fresh connect that starts a run replays from the log's newest event on.
    run = await attach(None, start_run_with=3)
    assert run.run_needs_producer
    assert run.replay_after == "20-0"
    assert [d.id for d in run.first_page] == ["20-0"]
    # A resume whose event was trimmed away: the page starts later, which the stream reads
    # as a gap.
    await client.xtrim(keys.log("f"), maxlen=10, approximate=False)
    gapped = await attach("5-0")
    assert gapped.status is AttachStatus.ATTACHED
    assert [d.id for d in gapped.first_page] == [f"{n}-0" for n in range(11, 21)]
    # Nothing to stream: no page.
    gone = await sessions.attach(
        "never", "1-0", require_issued=False, start_run_with=None, page_count=16
    )
    unknown = await sessions.attach(
        "new", None, require_issued=True, start_run_with=None, page_count=16
    )
    assert gone.first_page == unknown.first_page == ()


async def test_the_attach_returns_the_first_log_page_in_process(
    store: tuple[SessionStore, fakeredis.FakeAsyncRedis],
) -> None:
    await assert_first_pages(store[1])


@pytest.mark.redis
async def test_the_attach_returns_the_first_log_page_on_redis(
    target_client: RedisClient,
) -> None:
    await assert_first_pages(target_client)
