"""Key loading: PEM files and secrets from settings, JWKS documents, a JWKS file that changes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.settings import SettingsError, key_entries, load_settings
from service.token_keys import (
    JwksFile,
    KeyConfigError,
    KeyRing,
    load_key_ring,
    parse_jwks,
    signing_key_from_pem,
    signing_key_from_settings,
)
from service.tokens import InvalidToken, TokenVerifier

from app_clients import MakeSettings
from signing import KeyPair, claims, ec_key, ed_key, hs256_key, jwks, rsa_key, sign


@pytest.fixture(scope="module")
def rsa() -> KeyPair:
    return rsa_key()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_settings_keys_of_every_kind_load_and_verify(
    make_settings: MakeSettings, tmp_path: Path, rsa: KeyPair
) -> None:
    others = [ec_key(), ed_key()]
    settings = make_settings(
        token_hs256_secrets=["hs1:" + "s" * 32],
        token_public_keys=[key.config_entry(tmp_path) for key in (rsa, *others)],
    )
    check = TokenVerifier.from_settings(settings, load_key_ring(settings))
    for key in (hs256_key(secret="s" * 32), rsa, *others):
        assert check.verify(sign(key, claims(subscribe=[key.kid]))).subscribe == (key.kid,)


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ({"token_hs256_secrets": ["nokid" + "s" * 40]}, "'kid:secret'"),
        ({"token_hs256_secrets": ["k1:short"]}, "at least 32 bytes"),
        ({"token_hs256_secrets": ["bad kid:" + "s" * 40]}, "'kid:secret'"),
        ({"token_public_keys": ["k1:HS256:/x.pem"]}, "ALG one of"),
        ({"token_public_keys": ["k1:RS256"]}, "kid:ALG:path"),
        ({"token_public_keys": ["k1:none:/x.pem"]}, "ALG one of"),
        (
            {"token_hs256_secrets": ["k1:" + "s" * 40], "token_public_keys": ["k1:RS256:/x"]},
            "unique",
        ),
        ({"subscribe_auth": "tokens"}, "subscribe_auth"),
        ({"subscribe_auth": "token", "redis_url": "redis://127.0.0.1:1/0"}, "needs a key"),
        ({"token_cookie": "a b"}, "token_cookie"),
        ({"token_leeway_s": -1}, "token_leeway_s"),
        ({"token_jwks_check_s": 0}, "token_jwks_check_s"),
    ],
)
def test_bad_token_settings_stop_the_start(
    make_settings: MakeSettings, entries: dict[str, Any], problem: str
) -> None:
    with pytest.raises(SettingsError, match=problem) as caught:
        make_settings(**entries)
    assert "s" * 32 not in str(caught.value)  # secrets are never echoed


def test_a_secret_is_never_shown_in_a_settings_error(make_settings: MakeSettings) -> None:
    with pytest.raises(SettingsError) as caught:
        make_settings(token_hs256_secrets="k1:" + "topsecret" * 5)  # not a list
    assert "topsecret" not in str(caught.value)
    assert "topsecret" not in repr(make_settings(token_hs256_secrets=["k1:" + "topsecret" * 5]))


def test_token_mode_without_keys_is_allowed_only_embedded(make_settings: MakeSettings) -> None:
    assert make_settings(subscribe_auth="token").subscribe_auth == "token"


@pytest.mark.parametrize(
    ("alg", "maker", "problem"),
    [
        ("RS256", ec_key, "RSA key"),
        ("ES256", ed_key, "P-256"),
        ("EdDSA", ec_key, "Ed25519"),
    ],
)
def test_a_pem_of_the_wrong_type_is_refused(
    make_settings: MakeSettings, tmp_path: Path, alg: str, maker: Any, problem: str
) -> None:
    path = maker().write_public_pem(tmp_path)
    settings = make_settings(token_public_keys=[f"k9:{alg}:{path}"])
    with pytest.raises(KeyConfigError, match=problem):
        load_key_ring(settings)


def test_a_weak_rsa_key_is_refused(make_settings: MakeSettings, tmp_path: Path) -> None:
    path = rsa_key(bits=1024).write_public_pem(tmp_path)
    with pytest.raises(KeyConfigError, match="2048"):
        load_key_ring(make_settings(token_public_keys=[f"k:RS256:{path}"]))


def test_an_unreadable_or_garbled_pem_is_refused(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_key_ring(make_settings(token_public_keys=[f"k:ES256:{tmp_path / 'missing.pem'}"]))
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyConfigError, match="not a PEM public key"):
        load_key_ring(make_settings(token_public_keys=[f"k:ES256:{garbled}"]))


def test_jwks_documents(rsa: KeyPair) -> None:
    keys = [hs256_key(), rsa, ec_key(), ed_key()]
    parsed = parse_jwks(jwks(*keys).encode(), "test")
    assert {kid: key.alg for kid, key in parsed.items()} == {k.kid: k.alg for k in keys}
    # `alg` may be left out: it follows from the key type.
    bare = [{k: v for k, v in key.public_jwk().items() if k != "alg"} for key in keys]
    inferred = parse_jwks(json.dumps({"keys": bare}).encode(), "test")
    assert {kid: key.alg for kid, key in inferred.items()} == {k.kid: k.alg for k in keys}
    # Encryption keys are skipped.
    enc = {**ec_key("enc").public_jwk(), "use": "enc"}
    assert "enc" not in parse_jwks(json.dumps({"keys": [enc]}).encode(), "test")


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[]", "keys"),
        (b'{"keys": {}}', "keys"),
        (b'{"keys": [1]}', "JSON object"),
        (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(), "'kid'"),
        (json.dumps({"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}).encode(), "32 bytes"),
        (json.dumps({"keys": [{"kty": "RSA", "kid": "k", "alg": "none"}]}).encode(), "'alg'"),
        (json.dumps({"keys": [{"kty": "EC", "kid": "k", "alg": "ES256"}]}).encode(), "kid 'k'"),
    ],
)
def test_bad_jwks_documents_are_refused(document: bytes, problem: str) -> None:
    with pytest.raises(KeyConfigError, match=problem):
        parse_jwks(document, "test")


def test_jwks_refuses_private_keys_and_duplicate_kids() -> None:
    key = ec_key()
    import jwt  # noqa: PLC0415

    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.signing.key))
    with pytest.raises(KeyConfigError, match="private key"):
        parse_jwks(json.dumps({"keys": [{**private, "kid": "p"}]}).encode(), "test")
    with pytest.raises(KeyConfigError, match="twice"):
        parse_jwks(jwks(key, key).encode(), "test")


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_a_rewritten_jwks_file_is_reread_at_most_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = ed_key("first"), ec_key("second")
    path = tmp_path / "keys.json"
    path.write_text(jwks(first))
    clock = FakeClock()
    reads = []
    real_read = Path.read_bytes

    def counting_read(self: Path) -> bytes:
        reads.append(self)
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", counting_read)
    source = JwksFile(path, check_interval_s=2.0, clock=clock)
    check = TokenVerifier(KeyRing([], source))
    assert len(reads) == 1
    for _ in range(100):
        check.verify(sign(first, claims(subscribe=["a"])))
    assert len(reads) == 1, "an unchanged file is never read again"

    write_atomically(path, jwks(second))
    clock.now += 1.0
    with pytest.raises(InvalidToken):  # within the interval: not looked at yet
        check.verify(sign(second, claims(subscribe=["a"])))
    assert len(reads) == 1
    clock.now += 1.0
    for _ in range(100):
        check.verify(sign(second, claims(subscribe=["a"])))
    assert len(reads) == 2, "one read per change"
    with pytest.raises(InvalidToken):  # the old key is gone with the old version
        check.verify(sign(first, claims(subscribe=["a"])))


def test_a_broken_or_missing_jwks_file_keeps_the_last_good_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = ed_key("kept")
    path = tmp_path / "keys.json"
    path.write_text(jwks(key))
    clock = FakeClock()
    check = TokenVerifier(KeyRing([], JwksFile(path, 1.0, clock=clock)))
    token = sign(key, claims(subscribe=["a"]))

    with caplog.at_level(logging.WARNING, logger="service.token_keys"):
        path.write_text('{"keys": [')  # a half-written file
        clock.now += 1.0
        check.verify(token)
        path.unlink()
        clock.now += 1.0
        check.verify(token)
        clock.now += 1.0
        check.verify(token)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # one per problem, not one per check
    assert "not valid" in warnings[0]
    assert "cannot be read" in warnings[1]

    replacement = ec_key("replacement")
    path.write_text(jwks(replacement))
    clock.now += 1.0
    check.verify(sign(replacement, claims(subscribe=["a"])))


def test_a_missing_jwks_file_stops_the_start(make_settings: MakeSettings, tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="token_jwks_path"):
        load_key_ring(make_settings(token_jwks_path=str(tmp_path / "none.json")))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(KeyConfigError, match="not JSON"):
        load_key_ring(make_settings(token_jwks_path=str(broken)))


def test_configured_keys_win_over_the_jwks_file(
    make_settings: MakeSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    configured = hs256_key("same", "c" * 40)
    impostor = hs256_key("same", "i" * 40)
    path = tmp_path / "keys.json"
    path.write_text(jwks(impostor))
    settings = make_settings(token_hs256_secrets=["same:" + "c" * 40], token_jwks_path=str(path))
    with caplog.at_level(logging.WARNING):
        check = TokenVerifier.from_settings(settings, load_key_ring(settings))
    assert "both configured and in the JWKS file" in caplog.text
    check.verify(sign(configured, claims(subscribe=["a"])))
    with pytest.raises(InvalidToken):
        check.verify(sign(impostor, claims(subscribe=["a"])))


def test_signing_keys(make_settings: MakeSettings, tmp_path: Path, rsa: KeyPair) -> None:
    settings = make_settings(token_hs256_secrets=["a:" + "a" * 32, "b:" + "b" * 32])
    assert signing_key_from_settings(settings).kid == "a"
    assert signing_key_from_settings(settings, "b").key == b"b" * 32
    with pytest.raises(KeyConfigError, match="'c'"):
        signing_key_from_settings(settings, "c")
    with pytest.raises(KeyConfigError, match="no HS256 secret"):
        signing_key_from_settings(make_settings())
    for key in (rsa, ec_key(), ed_key()):
        pem = tmp_path / f"{key.kid}.key"
        pem.write_bytes(key.private_pem())
        loaded = signing_key_from_pem(pem, "mine")
        assert (loaded.kid, loaded.alg) == ("mine", key.alg)
    public = rsa.write_public_pem(tmp_path)
    with pytest.raises(KeyConfigError, match="private key"):
        signing_key_from_pem(public, "x")


def test_token_settings_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "SSE_SUBSCRIBE_AUTH": "token",
            "SSE_TOKEN_HS256_SECRETS": f"a:{'x' * 32}, b:{'y' * 32}",
            "SSE_TOKEN_LEEWAY_S": "2.5",
            "SSE_TOKEN_COOKIE": "app_sse",
        }
    )
    assert settings.subscribe_auth == "token"
    assert [entry.kid for entry in key_entries(settings)] == ["a", "b"]
    assert settings.token_leeway_s == 2.5
    assert settings.token_cookie == "app_sse"
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"SSE_TOKEN_HS256_SECRETS": "a:tooshortsecret"})
    assert "tooshortsecret" not in str(caught.value)


@pytest.mark.slow  # a second or more: left out of the quick loop
def test_a_bad_key_file_stops_a_worker_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "gone.pem"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    env.update(SSE_TOKEN_PUBLIC_KEYS=f"k1:ES256:{missing}", SSE_PORT="0")
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"sse-fanout: setting 'token_public_keys', key 'k1': cannot read {missing}: "
        "No such file or directory\n"
    )
