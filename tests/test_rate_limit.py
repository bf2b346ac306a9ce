"""Per-address rate limits on new sessions and demo runs: buckets, the table's bound, proxies."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.app import create_app
from service.errors import RateLimited
from service.keys import Keys
from service.rate_limit import RateLimiter, TrustedProxies, client_address
from service.redis.connections import RedisOpener
from service.settings import SettingsError, build_settings, load_settings

from app_clients import MakeSettings, StartClient
from redis_process import free_port
from stack_processes import Child, local_nginx_conf, nginx_argv, require_nginx
from waiting import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_full_burst_then_one_per_interval(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3, max_addresses=10, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    clock.now += 3600  # refills to the burst, never beyond
    assert [limiter.take("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_addresses_have_buckets_of_their_own(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_addresses=10, clock=clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0


def test_refusal_is_a_429_with_a_whole_retry_after(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=0.25, burst=1, max_addresses=10, clock=clock)
    limiter.take_or_refuse("a", "new sessions")
    clock.now += 0.5
    with pytest.raises(RateLimited) as refused:
        limiter.take_or_refuse("a", "new sessions")
    assert refused.value.status == 429
    assert refused.value.code == "rate_limited"
    assert refused.value.headers == {"Retry-After": "4"}  # 3.5 s, rounded up
    assert "new sessions" in refused.value.detail


def test_check_takes_nothing_and_spend_may_go_into_debt(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=2, max_addresses=10, clock=clock)
    for _ in range(5):
        limiter.check("a", "runs")
    for _ in range(4):  # four in flight at once
        limiter.spend("a")
    assert limiter.wait_s("a") == pytest.approx(3.0)
    with pytest.raises(RateLimited):
        limiter.check("a", "runs")


def test_a_refund_gives_back_a_token_but_never_beyond_the_burst(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=0.001, burst=2, max_addresses=10, clock=clock)
    assert limiter.take("a") == 0.0
    limiter.refund("a")
    limiter.refund("a")  # nothing was taken for this one
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1000)]


def test_rate_zero_is_no_limit_and_remembers_nobody(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=0, burst=1, max_addresses=10, clock=clock)
    assert all(limiter.take(f"a{n}") == 0.0 for n in range(100))
    assert len(limiter) == 0


def test_the_table_of_addresses_is_bounded_and_forgets_the_least_recent(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(rate_per_s=0.001, burst=1, max_addresses=100, clock=clock)
    limiter.take("regular")
    for n in range(10_000):
        limiter.take(f"10.0.{n // 256}.{n % 256}")
        if n % 50 == 0:
            assert limiter.take("regular") > 0  # seen often: remembered, still limited
        assert len(limiter) <= 100
    assert len(limiter) == 100
    assert limiter.take("10.0.0.0") == 0.0  # long forgotten: a fresh bucket


def test_filling_the_table_with_new_addresses_does_not_reset_a_limited_one(
    clock: FakeClock,
) -> None:
    # A client with many addresses (an IPv6 block) spends its burst from one, then comes
    # from thousands of others so the table must forget something: not the limited one.
    limiter = RateLimiter(rate_per_s=1 / 3600, burst=3, max_addresses=100, clock=clock)
    for _ in range(3):
        limiter.take("limited")
    assert limiter.take("limited") > 0
    for n in range(10_000):
        limiter.take(f"2001:db8:{n:x}::/64")
        assert len(limiter) <= 100
    assert limiter.take("limited") > 0


def test_full_buckets_are_forgotten_before_limited_ones(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=2, max_addresses=2, clock=clock)
    for _ in range(10):  # ten in flight at once: eight tokens in debt, the oldest entry
        limiter.spend("in-debt")
    limiter.take("idle")
    clock.now += 5  # "idle" is full again (a new bucket would be the same); the other is not
    limiter.take("newcomer")
    assert len(limiter) == 2
    assert limiter.wait_s("in-debt") == pytest.approx(4.0)


PROXY = TrustedProxies(["10.0.0.0/8", "192.0.2.1"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "real_ip", "expected"),
    [
        # A client talking to us directly: its headers are not believed.
        ("198.51.100.7", ["203.0.113.9"], "203.0.113.8", "198.51.100.7"),
        # Through a trusted proxy that appended the client's address.
        ("10.1.2.3", ["203.0.113.9"], None, "203.0.113.9"),
        # The client's own X-Forwarded-For is to the left of what the proxy appended.
        ("10.1.2.3", ["1.2.3.4, 203.0.113.9"], None, "203.0.113.9"),
        # Two trusted proxies in a row.
        ("192.0.2.1", ["203.0.113.9, 10.9.9.9"], None, "203.0.113.9"),
        ("192.0.2.1", ["203.0.113.9", "10.9.9.9"], None, "203.0.113.9"),
        # Every hop trusted: the first one is the client.
        ("10.1.2.3", ["10.4.4.4, 10.5.5.5"], None, "10.4.4.4"),
        # A hop that is no address stops the walk at the last trusted one.
        ("10.1.2.3", ["203.0.113.9, garbage"], None, "10.1.2.3"),
        ("10.1.2.3", ["203.0.113.9, unknown, 10.5.5.5"], None, "10.5.5.5"),
        # X-Real-IP when there is no X-Forwarded-For.
        ("10.1.2.3", [], "203.0.113.9", "203.0.113.9"),
        ("10.1.2.3", [], "not an ip", "10.1.2.3"),
        # IPv6 clients are counted per /64; IPv4-mapped ones as IPv4.
        ("2001:db8:1:2:3:4:5:6", [], None, "2001:db8:1:2::/64"),
        ("10.1.2.3", ["2001:db8:1:2::99"], None, "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", [], None, "198.51.100.7"),
        (None, ["203.0.113.9"], None, "unknown"),
        # Hops with a port, and bracketed IPv6 hops, as some proxies write them.
        ("10.1.2.3", ["203.0.113.9:5678"], None, "203.0.113.9"),
        ("10.1.2.3", ["[2001:db8:1:2::9]:443"], None, "2001:db8:1:2::/64"),
        ("10.1.2.3", ["[2001:db8:1:2::9]"], None, "2001:db8:1:2::/64"),
        ("10.1.2.3", ["1.2.3.4:1, 203.0.113.9:2"], None, "203.0.113.9"),
        ("192.0.2.1", ["203.0.113.9, 10.9.9.9:80"], None, "203.0.113.9"),
        ("192.0.2.1", ["203.0.113.9, [::ffff:10.9.9.9]:80"], None, "203.0.113.9"),
        ("10.1.2.3", [], "203.0.113.9:80", "203.0.113.9"),
        # A port that is not one makes the hop no address.
        ("10.1.2.3", ["203.0.113.9:http"], None, "10.1.2.3"),
        ("10.1.2.3", ["203.0.113.9:99999"], None, "10.1.2.3"),
        ("10.1.2.3", ["[2001:db8::9]:"], None, "10.1.2.3"),
        ("10.1.2.3", ["[2001:db8::9"], None, "10.1.2.3"),
        ("10.1.2.3", ["[203.0.113.9]:80"], None, "10.1.2.3"),
    ],
)
def test_the_client_address_believes_forwarding_headers_only_from_trusted_proxies(
    peer: str | None, forwarded: list[str], real_ip: str | None, expected: str
) -> None:
    assert client_address(peer, forwarded, real_ip, PROXY) == expected


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (64, "2001:db8:1:2::/64"),
        (56, "2001:db8:1::/56"),
        (48, "2001:db8:1::/48"),
        (128, "2001:db8:1:2:3:4:5:6/128"),
    ],
)
def test_ipv6_clients_are_counted_per_the_configured_prefix(prefix: int, expected: str) -> None:
    peer = "2001:db8:1:2:3:4:5:6"
    assert client_address(peer, [], None, PROXY, ipv6_prefix=prefix) == expected
    assert client_address("203.0.113.9", [], None, PROXY, ipv6_prefix=prefix) == "203.0.113.9"


def test_nothing_is_trusted_by_default() -> None:
    nobody = TrustedProxies([])
    assert client_address("127.0.0.1", ["203.0.113.9"], "203.0.113.8", nobody) == "127.0.0.1"
    assert ipaddress.ip_address("127.0.0.1") not in nobody


# Over HTTP: one token per hour after the burst, so a refusal is certain and lasts the test.
SLOW = 1 / 3600


@pytest.fixture
async def inspector(fake_opener: RedisOpener, make_settings: MakeSettings) -> AsyncIterator[Any]:
    redis = await fake_opener(make_settings())
    yield redis
    await redis.aclose()


async def test_get_session_id_is_limited_per_address_with_retry_after(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    inspector: Any,
) -> None:
    settings = make_settings(session_rate_per_s=SLOW, session_burst=3)
    client = await start_client(settings, fake_opener)
    for _ in range(3):
        assert (await client.get("/sse/getSessionId")).status == 200
    stored = await inspector.dbsize()
    refused = await client.get("/sse/getSessionId")
    assert refused.status == 429
    assert (await refused.json())["error"] == "rate_limited"
    assert 3000 < int(refused.headers["Retry-After"]) <= 3600
    assert await inspector.dbsize() == stored  # nothing issued
    metrics = await (await client.get("/metrics")).text()
    assert 'sse_rate_limited_total{kind="sessions"} 1.0' in metrics
    assert 'sse_rate_limited_total{kind="runs"} 0.0' in metrics


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    settings = make_settings(
        session_rate_per_s=SLOW, session_burst=1, trusted_proxies=["127.0.0.1"]
    )
    client = await start_client(settings, fake_opener)

    async def status(forwarded_for: str) -> int:
        response = await client.get("/sse/getSessionId", headers={"X-Forwarded-For": forwarded_for})
        return int(response.status)

    assert await status("203.0.113.1") == 200
    assert await status("203.0.113.1") == 429
    assert await status("203.0.113.2") == 200
    # What the client itself put in front does not make it someone else.
    assert await status("198.51.100.99, 203.0.113.1") == 429


async def test_forwarding_headers_from_an_untrusted_peer_change_nothing(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    client = await start_client(
        make_settings(session_rate_per_s=SLOW, session_burst=1), fake_opener
    )
    assert (await client.get("/sse/getSessionId")).status == 200
    for n in range(5):
        spoofed = {"X-Forwarded-For": f"203.0.113.{n}", "X-Real-IP": f"198.51.100.{n}"}
        assert (await client.get("/sse/getSessionId", headers=spoofed)).status == 429


async def test_fresh_connects_are_limited_only_by_the_runs_they_start(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    inspector: Any,
) -> None:
    # Runs that stay active: a fresh connect to a session with a run under way starts none.
    settings = make_settings(run_rate_per_s=SLOW, run_burst=2, producer_interval_ms=60_000)
    client = await start_client(settings, fake_opener)
    keys = Keys()

    async def fresh(session_id: str) -> int:
        async with client.get("/sse/connect", params={"sessionId": session_id}) as response:
            return int(response.status)

    assert await fresh("first") == 200  # starts a run: one token left

    async def claimed() -> bool:
        return bool(await inspector.exists(keys.lease("first")))

    await wait_for(claimed)
    assert await fresh("first") == 200  # a second viewer: no run started, no token spent
    assert await fresh("second") == 200  # starts a run: no token left
    refused = await client.get("/sse/connect", params={"sessionId": "third"})
    assert refused.status == 429
    metrics = await (await client.get("/metrics")).text()
    assert 'sse_rate_limited_total{kind="runs"} 1.0' in metrics
    assert (await refused.json())["error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) > 3000
    assert not await inspector.exists(keys.session("third"), keys.run("third"))
    # A resume starts no run and is never limited.
    async with client.get(
        "/sse/connect", params={"sessionId": "first"}, headers={"Last-Event-ID": "1-0"}
    ) as resumed:
        assert resumed.status == 200


async def test_concurrent_fresh_connects_start_no_more_runs_than_the_burst(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    inspector: Any,
) -> None:
    settings = make_settings(run_rate_per_s=SLOW, run_burst=5, producer_interval_ms=60_000)
    client = await start_client(settings, fake_opener)

    async def fresh(n: int) -> int:
        async with client.get("/sse/connect", params={"sessionId": f"crowd{n}"}) as response:
            return int(response.status)

    statuses = await asyncio.gather(*(fresh(n) for n in range(40)))
    assert sorted(statuses) == [200] * 5 + [429] * 35
    runs = [n for n in range(40) if await inspector.exists(Keys().run(f"crowd{n}"))]
    assert len(runs) == 5


async def test_without_demo_runs_fresh_connects_are_not_limited(
    start_client: StartClient,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
) -> None:
    settings = make_settings(run_rate_per_s=SLOW, run_burst=1, demo_runs=False)
    client = await start_client(settings, fake_opener)
    for n in range(5):
        async with client.get("/sse/connect", params={"sessionId": f"s{n}"}) as response:
            assert response.status == 200


def test_rate_limit_settings_are_checked_at_start() -> None:
    with pytest.raises(SettingsError, match="'session_rate_per_s' must not be negative"):
        build_settings({"session_rate_per_s": -1})
    with pytest.raises(SettingsError, match="'run_burst' must be at least 1"):
        build_settings({"run_burst": 0})
    with pytest.raises(SettingsError, match="'trusted_proxies' holds 'nginx'"):
        load_settings(None, {"SSE_TRUSTED_PROXIES": "10.0.0.0/8,nginx"})
    settings = load_settings(None, {"SSE_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1"})
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    assert settings.ipv6_client_prefix == 64
    for bad in (0, 129):
        with pytest.raises(SettingsError, match="'ipv6_client_prefix' must be 1 to 128"):
            build_settings({"ipv6_client_prefix": bad})


async def test_behind_the_stacks_nginx_a_client_cannot_name_itself(
    aiohttp_server: Any,
    make_settings: MakeSettings,
    fake_opener: RedisOpener,
    tmp_path: Path,
) -> None:
    """config/nginx.conf sends the workers the address it saw, whatever the client wrote.

    The client here is on loopback, inside the trusted networks, as a client on the stack's
    own private network would be: what it writes itself must still not be believed.
    """
    settings = make_settings(
        session_rate_per_s=SLOW, session_burst=1, trusted_proxies=["127.0.0.0/8"]
    )
    server = await aiohttp_server(create_app(settings, fake_opener), access_log=None)
    prefix, listen_port = tmp_path / "nginx", free_port()
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(local_nginx_conf([server.port], listen_port))
    nginx = Child(
        "nginx",
        nginx_argv(require_nginx(), prefix, directives="daemon off;"),
        dict(os.environ),
        tmp_path / "nginx.log",
    )
    nginx.start()
    base = f"http://127.0.0.1:{listen_port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def status(forwarded_for: str) -> int:
                try:
                    async with http.get(
                        f"{base}/sse/getSessionId", headers={"X-Forwarded-For": forwarded_for}
                    ) as response:
                        return response.status
                except aiohttp.ClientError:
                    return 0

            async def up() -> bool:
                return await status("198.51.100.1") == 200

            await wait_for(up, timeout_s=15, interval_s=0.05)
            assert await status("198.51.100.2") == 429
            assert await status("198.51.100.3, 127.0.0.1") == 429
    finally:
        nginx.stop()
