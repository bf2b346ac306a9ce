"""Per-client-address rate limits on what costs the service work: new sessions and demo runs.

Each limit is a token bucket per client address (`rate_per_s` tokens a second, up to `burst`),
kept in this worker's memory: limits are per worker, so N workers behind a load balancer
allow up to N times as much. The table of addresses is bounded by `max_addresses`. To make
room it forgets a full bucket (one that refilled: a new one would be the same) among the
least recently seen, or failing that the fullest of them, never simply the oldest: a client
with many addresses could otherwise fill the table to have its own limited bucket forgotten.

IPv6 clients are counted per block of `ipv6_client_prefix` bits, /64 by default: the block
a single subscriber always holds (one LAN), so rotating addresses inside it gains nothing.
A wider default (/56, /48) would make a whole site, or many subscribers of a carrier that
hands out /64s from one /48, share one budget; a deployment seeing rotation across /64s sets
56 or 48, and the eviction above keeps such rotation from resetting anyone's bucket.

Behind a proxy every request comes from the proxy's address, so the client's is read from
`X-Forwarded-For` (or `X-Real-IP`), but only when the peer is one of `trusted_proxies`: any
client can send those headers. Hops may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric

from .errors import RateLimited
from .settings import Settings

Clock = Callable[[], float]
IPV6_CLIENT_PREFIX = 64
UNKNOWN_ADDRESS = "unknown"
# How many of the least recently seen buckets are looked at to choose one to forget.
EVICTION_CANDIDATES = 32


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets keyed by client address, the least recently seen forgotten first."""

    def __init__(
        self, rate_per_s: float, burst: int, max_addresses: int, clock: Clock = time.monotonic
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.refused = 0

    @property
    def enabled(self) -> bool:
        """A rate of 0 switches the limit off."""
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def wait_s(self, address: str) -> float:
        """Seconds until `address` may spend a token: 0 if it may now."""
        if not self.enabled:
            return 0.0
        bucket = self._refilled(address)
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate_per_s

    def spend(self, address: str) -> None:
        """Take a token, into debt if there is none (requests that were already in flight)."""
        if self.enabled:
            self._refilled(address).tokens -= 1

    def refund(self, address: str) -> None:
        """Give back a token taken for something that did not happen (never beyond the burst)."""
        if self.enabled:
            bucket = self._refilled(address)
            bucket.tokens = min(float(self.burst), bucket.tokens + 1)

    def take(self, address: str) -> float:
        """Spend a token if one is there and return 0; else the seconds until one is."""
        wait = self.wait_s(address)
        if wait == 0:
            self.spend(address)
        return wait

    def check(self, address: str, what: str) -> None:
        """Raise RateLimited (429 + Retry-After) unless `address` may spend a token now."""
        self._refuse_if_waiting(self.wait_s(address), what)

    def take_or_refuse(self, address: str, what: str) -> None:
        """Spend a token, or raise RateLimited (429 + Retry-After)."""
        self._refuse_if_waiting(self.take(address), what)

    def _refuse_if_waiting(self, wait_s: float, what: str) -> None:
        if wait_s > 0:
            self.refused += 1
            retry_after = max(1, math.ceil(wait_s))
            raise RateLimited(
                f"too many {what} from this address; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    def _refilled(self, address: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                self._forget_one(now)
            bucket = self._buckets[address] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(address)
            bucket.tokens = self._tokens_at(bucket, now)
            bucket.at = now
        return bucket

    def _tokens_at(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.at)
        return min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)

    def _forget_one(self, now: float) -> None:
        """Forget the first full bucket among the least recently seen, else their fullest."""
        victim, most = "", -math.inf
        for address, bucket in itertools.islice(self._buckets.items(), EVICTION_CANDIDATES):
            tokens = self._tokens_at(bucket, now)
            if tokens >= self.burst:
                victim = address
                break
            if tokens > most:
                victim, most = address, tokens
        del self._buckets[victim]


class TrustedProxies:
    """The peers whose `X-Forwarded-For` / `X-Real-IP` name the client."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address) and any(
            address in network for network in self._networks
        )


def client_address(
    peer: str | None,
    forwarded_for: list[str],
    real_ip: str | None,
    trusted: TrustedProxies,
    *,
    ipv6_prefix: int = IPV6_CLIENT_PREFIX,
) -> str:
    """The key a client is limited under: its address, or its block of `ipv6_prefix` for IPv6.

    When the peer is a trusted proxy, `X-Forwarded-For` is read from the right (the hop the
    proxy itself added) past every trusted hop; the first other address is the client's.
    Without that header, `X-Real-IP` names it. A hop that is not an IP address stops the walk
    at the last trusted one, so a malformed header cannot pick an arbitrary key.
    """
    peer_ip = _ip(peer)
    if peer_ip is None:
        return UNKNOWN_ADDRESS
    if peer_ip not in trusted:
        return _key(peer_ip, ipv6_prefix)
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer_ip
    for hop in reversed(hops):
        hop_ip = _ip(_without_port(hop))
        if hop_ip is None:
            return _key(client, ipv6_prefix)
        client = hop_ip
        if hop_ip not in trusted:
            return _key(hop_ip, ipv6_prefix)
    if not hops:
        client = _ip(_without_port(real_ip or "")) or peer_ip
    return _key(client, ipv6_prefix)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# `[v6]`, `[v6]:port`, `v4:port`; anything else is taken as an address without a port.
_WITH_PORT = re.compile(
    r"\[(?P<v6>[^\]]*)\](?::(?P<v6_port>\d{1,5}))?|(?P<v4>[\d.]+):(?P<v4_port>\d{1,5})"
)


def _without_port(hop: str) -> str | None:
    """The address part of a forwarded hop; None when its port or brackets are malformed."""
    hop = hop.strip()
    if "[" not in hop and hop.count(":") != 1:
        return hop
    match = _WITH_PORT.fullmatch(hop)
    if match is None:
        return None
    port = match["v6_port"] or match["v4_port"]
    if port is not None and int(port) > 65535:
        return None
    if match["v6"] is not None:
        return match["v6"] if ":" in match["v6"] else None
    return match["v4"]


def _ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _key(address: IPAddress, ipv6_prefix: int) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A worker's limits: sessions issued and demo runs started, per client address."""

    sessions: RateLimiter
    runs: RateLimiter
    trusted_proxies: TrustedProxies
    ipv6_prefix: int = IPV6_CLIENT_PREFIX

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = time.monotonic) -> RateLimits:
        """The limits `settings` configure."""
        size = settings.rate_limit_addresses
        return cls(
            sessions=RateLimiter(settings.session_rate_per_s, settings.session_burst, size, clock),
            runs=RateLimiter(settings.run_rate_per_s, settings.run_burst, size, clock),
            trusted_proxies=TrustedProxies(settings.trusted_proxies),
            ipv6_prefix=settings.ipv6_client_prefix,
        )

    def address_of(self, request: web.Request) -> str:
        """The client address `request` is limited under (see `client_address`)."""
        address = request.get(_address_key)
        if address is None:
            address = request[_address_key] = client_address(
                request.remote,
                request.headers.getall("X-Forwarded-For", []),
                request.headers.get("X-Real-IP"),
                self.trusted_proxies,
                ipv6_prefix=self.ipv6_prefix,
            )
        return address


class RateLimitCollector:
    """The requests each limit refused, for `/metrics`."""

    def __init__(self, limits: RateLimits) -> None:
        self._limits = limits

    def collect(self) -> Iterator[Metric]:
        """One counter family, labelled by the limit that refused."""
        family = CounterMetricFamily(
            "sse_rate_limited",
            "Requests refused with 429 because their client address was over a limit",
            labels=["kind"],
        )
        family.add_metric(["sessions"], self._limits.sessions.refused)
        family.add_metric(["runs"], self._limits.runs.refused)
        yield family


_address_key = web.RequestKey("client_address_key", str)
