"""`redis+sentinel://` URLs: every part parsed, every malformed one refused by name."""

from __future__ import annotations

import pytest

from service.logs import redacted_url
from service.sentinel_url import SentinelAddress, is_sentinel_url, parse_sentinel_url
from service.settings import SettingsError, build_settings, load_settings


def test_hosts_service_and_db() -> None:
    assert parse_sentinel_url("redis+sentinel://a.example:26380,10.0.0.2,b:1/mymaster/3") == (
        SentinelAddress(
            sentinels=(("a.example", 26380), ("10.0.0.2", 26379), ("b", 1)),
            service_name="mymaster",
            db=3,
        )
    )


def test_db_defaults_to_zero_and_a_trailing_slash_is_fine() -> None:
    assert parse_sentinel_url("redis+sentinel://h/svc").db == 0
    assert parse_sentinel_url("redis+sentinel://h/svc/").db == 0


def test_credentials_for_the_servers_and_for_the_sentinels() -> None:
    address = parse_sentinel_url(
        "redis+sentinel://app:p%40ss%3Aword@h1,h2/svc/0"
        "?sentinel_username=watcher&sentinel_password=s%26cret"
    )
    assert (address.username, address.password) == ("app", "p@ss:word")
    assert (address.sentinel_username, address.sentinel_password) == ("watcher", "s&cret")
    # Passwords stay out of reprs (and so out of logged settings and tracebacks).
    assert "p@ss" not in repr(address)
    assert "s&cret" not in repr(address)


def test_a_password_alone_and_an_ipv6_sentinel() -> None:
    address = parse_sentinel_url("redis+sentinel://:secret@[::1]:26380,[fe80::1]/svc")
    assert (address.username, address.password) == (None, "secret")
    assert address.sentinels == (("::1", 26380), ("fe80::1", 26379))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h:26379/svc", "must start with redis\\+sentinel://"),
        ("redis+sentinel://h1,h2", "must name the monitored service"),
        ("redis+sentinel://h1,h2/", "must name the monitored service"),
        ("redis+sentinel:///svc", "host\\[:port\\]"),
        ("redis+sentinel://h1,,h2/svc", "host\\[:port\\]"),
        ("redis+sentinel://h1:port/svc", "invalid Sentinel port in 'h1:port'"),
        ("redis+sentinel://h1:70000/svc", "invalid Sentinel port"),
        ("redis+sentinel://[::1/svc", "malformed IPv6"),
        ("redis+sentinel://h/svc/zero", "db a number"),
        ("redis+sentinel://h/svc/0/x", "/service or /service/db"),
        ("redis+sentinel://h/sv c", "must name the monitored service"),
        ("redis+sentinel://h/svc?password=x", "unknown parameter 'password'"),
        ("redis+sentinel://h/svc?sentinel_password=a&sentinel_password=b", "twice"),
        ("redis+sentinel://h/svc#frag", "fragment"),
    ],
)
def test_malformed_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_sentinel_url(url)


def test_a_bad_sentinel_url_is_a_settings_error_naming_the_key_not_the_password() -> None:
    with pytest.raises(SettingsError, match=r"'redis_url' .*must name the monitored service") as e:
        load_settings(None, {"SSE_REDIS_URL": "redis+sentinel://:hunter2@h1,h2"})
    assert "hunter2" not in str(e.value)


def test_sentinel_and_cluster_do_not_mix() -> None:
    with pytest.raises(SettingsError, match="'redis_cluster' cannot be combined"):
        build_settings({"redis_url": "redis+sentinel://h/svc", "redis_cluster": True})


def test_a_good_sentinel_url_is_accepted_and_logged_without_passwords() -> None:
    url = "redis+sentinel://app:hunter2@h1:26379,h2/svc/0?sentinel_password=swordfish"
    assert build_settings({"redis_url": url}).redis_url == url
    assert is_sentinel_url(url)
    logged = redacted_url(url)
    assert "hunter2" not in logged
    assert "swordfish" not in logged
    assert logged.startswith("redis+sentinel://app:***@h1:26379,h2/svc/0")
