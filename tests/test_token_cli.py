"""`sse-fanout token`: the minted token is one the configured worker accepts, for what was asked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.settings import build_settings
from service.token_cli import mint_command, parse_duration_s
from service.token_keys import load_key_ring
from service.tokens import Scope, TokenVerifier

from signing import ec_key, ed_key, rsa_key

SECRET = "cli-secret-0123456789abcdefghijkl"
ENV = {"SSE_TOKEN_HS256_SECRETS": f"k1:{SECRET},k2:{SECRET[::-1]}"}


def verifier(**settings: object) -> TokenVerifier:
    built = build_settings(
        {"token_hs256_secrets": [f"k1:{SECRET}", f"k2:{SECRET[::-1]}"], **settings}
    )
    return TokenVerifier.from_settings(built, load_key_ring(built))


def mint(capsys: pytest.CaptureFixture[str], *args: str, env: dict[str, str] = ENV) -> str:
    assert mint_command(list(args), env) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1
    return out.strip()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("7d", 604800), (" 1s ", 1)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5m", "1.5h", "10 m", "1w", "367d", "1e3"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_s(text)


def test_a_subscriber_token_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    token = mint(capsys, "--session", "abc", "--session", "room-*", "--ttl", "10m")
    grant = verifier().verify(token)
    assert grant.subscribe == ("abc", "room-*")
    assert grant.publish == ()
    assert abs(grant.expires_at - (time.time() + 600)) < 5


def test_publish_and_both(capsys: pytest.CaptureFixture[str]) -> None:
    grant = verifier().verify(mint(capsys, "--session", "abc", "--publish"))
    assert (grant.subscribe, grant.publish) == ((), ("abc",))
    grant = verifier().verify(mint(capsys, "--session", "abc", "--publish", "--subscribe"))
    assert grant.covers(Scope.SUBSCRIBE, "abc")
    assert grant.covers(Scope.PUBLISH, "abc")


def test_the_settings_audience_and_issuer_go_in(capsys: pytest.CaptureFixture[str]) -> None:
    env = {**ENV, "SSE_TOKEN_AUDIENCE": "app", "SSE_TOKEN_ISSUER": "backend"}
    token = mint(capsys, "--session", "abc", "--kid", "k2", env=env)
    verifier(token_audience="app", token_issuer="backend").verify(token)


def test_a_private_key_file_signs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for key in (rsa_key(), ec_key(), ed_key()):
        private = tmp_path / f"{key.kid}.key"
        private.write_bytes(key.private_pem())
        token = mint(capsys, "--session", "abc", "--key", str(private), "--kid", key.kid, env={})
        check = verifier(token_public_keys=[key.config_entry(tmp_path)])
        assert check.verify(token).subscribe == ("abc",)


@pytest.mark.parametrize(
    ("args", "env", "problem"),
    [
        (["--session", "a b"], ENV, "a session id"),
        (["--session", "abc", "--ttl", "forever"], ENV, "not a duration"),
        (["--session", "abc"], {}, "no HS256 secret"),
        (["--session", "abc", "--kid", "k9"], ENV, "'k9'"),
        (["--session", "abc", "--key", "/nonexistent.pem"], {}, "--kid"),
        (["--session", "abc", "--key", "/nonexistent.pem", "--kid", "x"], {}, "cannot read"),
        (["--session", "abc"], {"SSE_TOKEN_HS256_SECRETS": "k1:short"}, "32 bytes"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], env: dict[str, str], problem: str
) -> None:
    assert mint_command(args, env) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sse-fanout token: ")
    assert problem in err
    assert err.count("\n") == 1
    assert "short" not in err  # the secret's text is never shown


@pytest.mark.slow  # a second or more: left out of the quick loop
def test_the_console_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    result = subprocess.run(
        [sys.executable, "-m", "service", "token", "--session", "abc", "--ttl", "10m"],
        env={**env, **ENV}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert verifier().verify(result.stdout.strip()).subscribe == ("abc",)
