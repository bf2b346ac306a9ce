"""Per-client-address rate limits on what costs the service work: new sessions and demo runs.

Each limit is a token bucket per client address (`rate_per_s` tokens a second, up to `burst`),
kept in this worker's memory: limits are per worker, so N workers behind a load balancer
allow up to N times as much. The table of addresses is bounded: past `max_addresses`, the
least recently seen address is forgotten, so many addresses cannot grow memory without
bound (each forgotten one starts again with a full burst). IPv6 clients are counted per /64,
the block one subscriber usually holds, so rotating addresses inside it gains nothing.

Behind a proxy every request comes from the proxy's address, so the client's is read from
`X-Forwarded-For` (or `X-Real-IP`), but only when the peer is one of `trusted_proxies`: any
client can send those headers.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from .errors import RateLimited
from .settings import Settings

Clock = Callable[[], float]
IPV6_CLIENT_PREFIX = 64
UNKNOWN_ADDRESS = "unknown"


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
        _refuse_if_waiting(self.wait_s(address), what)

    def take_or_refuse(self, address: str, what: str) -> None:
        """Spend a token, or raise RateLimited (429 + Retry-After)."""
        _refuse_if_waiting(self.take(address), what)

    def _refilled(self, address: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = _Bucket(float(self.burst), now)
            if len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
            elapsed = max(0.0, now - bucket.at)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
            bucket.at = now
        return bucket


def _refuse_if_waiting(wait_s: float, what: str) -> None:
    if wait_s > 0:
        retry_after = max(1, math.ceil(wait_s))
        raise RateLimited(
            f"too many {what} from this address; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class TrustedProxies:
    """The peers whose `X-Forwarded-For` / `X-Real-IP` name the client."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address) and any(
            address in network for network in self._networks
        )


def client_address(
    peer: str | None, forwarded_for: list[str], real_ip: str | None, trusted: TrustedProxies
) -> str:
    """The key a client is limited under: its address, or its /64 for IPv6.

    When the peer is a trusted proxy, `X-Forwarded-For` is read from the right (the hop the
    proxy itself added) past every trusted hop; the first other address is the client's.
    Without that header, `X-Real-IP` names it. A hop that is not an IP address stops the walk
    at the last trusted one, so a malformed header cannot pick an arbitrary key.
    """
    peer_ip = _ip(peer)
    if peer_ip is None:
        return UNKNOWN_ADDRESS
    if peer_ip not in trusted:
        return _key(peer_ip)
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer_ip
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            return _key(client)
        client = hop_ip
        if hop_ip not in trusted:
            return _key(hop_ip)
    if not hops:
        client = _ip(real_ip) or peer_ip
    return _key(client)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def _key(address: IPAddress) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        block = ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False)
        return str(block)
    return str(address)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A worker's limits: sessions issued and demo runs started, per client address."""

    sessions: RateLimiter
    runs: RateLimiter
    trusted_proxies: TrustedProxies

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = time.monotonic) -> RateLimits:
        """The limits `settings` configure."""
        size = settings.rate_limit_addresses
        return cls(
            sessions=RateLimiter(settings.session_rate_per_s, settings.session_burst, size, clock),
            runs=RateLimiter(settings.run_rate_per_s, settings.run_burst, size, clock),
            trusted_proxies=TrustedProxies(settings.trusted_proxies),
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
            )
        return address


_address_key = web.RequestKey("client_address_key", str)
