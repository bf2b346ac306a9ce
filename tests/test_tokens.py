"""Token checks: every key type, every claim, forgeries, algorithm confusion, scopes, minting."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.token_keys import KeyRing, VerifyKey, verify_key_of
from service.tokens import (
    MAX_TOKEN_CHARS,
    Grant,
    InvalidToken,
    Scope,
    TokenExpired,
    TokenVerifier,
    mint_token,
)

from signing import (
    KeyPair,
    b64,
    claims,
    ec_key,
    ed_key,
    hs256_key,
    raw_token,
    rsa_key,
    sign,
)

KEY_MAKERS: dict[str, Callable[[], KeyPair]] = {
    "HS256": hs256_key,
    "RS256": rsa_key,
    "ES256": ec_key,
    "EdDSA": ed_key,
}


@pytest.fixture(scope="module")
def keys() -> dict[str, KeyPair]:
    """One key of each algorithm (RSA generation is slow: once per module)."""
    return {alg: make() for alg, make in KEY_MAKERS.items()}


def verifier(*keys: KeyPair, **options: Any) -> TokenVerifier:
    ring = KeyRing([verify_key_of(key.signing) for key in keys])
    return TokenVerifier(ring, **options)


def refused(check: TokenVerifier, token: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        check.verify(token)
    assert not isinstance(caught.value, TokenExpired)
    return caught.value


@pytest.mark.parametrize("alg", list(KEY_MAKERS))
def test_each_key_type_verifies_its_tokens(keys: dict[str, KeyPair], alg: str) -> None:
    key = keys[alg]
    grant = verifier(*keys.values()).verify(sign(key, claims(subscribe=["abc"], publish=["p-*"])))
    assert grant.subscribe == ("abc",)
    assert grant.publish == ("p-*",)
    assert grant.expires_at > time.time()


@pytest.mark.parametrize("alg", list(KEY_MAKERS))
def test_a_tampered_token_is_refused(keys: dict[str, KeyPair], alg: str) -> None:
    key = keys[alg]
    check = verifier(key)
    token = sign(key, claims(subscribe=["abc"]))
    header, body, signature = token.split(".")
    # Another session in the body, the signature left as it was.
    forged_body = b64(json.dumps(claims(subscribe=["*"])).encode())
    error = refused(check, f"{header}.{forged_body}.{signature}")
    assert error.detail == "the token's signature does not verify"
    # One signature bit flipped.
    raw = bytearray(jwt.utils.base64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    refused(check, f"{header}.{body}.{b64(bytes(raw))}")
    # Signed by another key of the same algorithm under the same kid.
    impostor = KEY_MAKERS[alg]() if alg != "HS256" else hs256_key(secret="x" * 40)
    refused(check, sign(impostor, claims(subscribe=["abc"]), kid=key.kid))


def test_alg_none_is_refused(keys: dict[str, KeyPair]) -> None:
    check = verifier(*keys.values())
    for alg in ("none", "None", "NONE", ""):
        for kid in ("hs1", None):
            header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
            token = raw_token(header, claims(subscribe=["abc"]))
            error = refused(check, token)
            assert "algorithm" in error.detail
    # PyJWT's own unsecured form, too.
    unsecured = jwt.encode(claims(subscribe=["abc"]), "", algorithm="none")
    refused(check, unsecured)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_hs256_signed_with_the_public_key_is_refused(keys: dict[str, KeyPair], alg: str) -> None:
    """Algorithm confusion: the public key (which anyone may have) used as an HMAC secret."""
    public = keys[alg]
    check = verifier(keys["HS256"], public)
    header = {"alg": "HS256", "typ": "JWT"}
    for kid in (public.kid, None):
        head = {**header, **({"kid": kid} if kid else {})}
        body = claims(subscribe=["*"])
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}"
        mac = hmac.new(public.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        refused(check, f"{signing_input}.{b64(mac)}")


def test_a_key_only_checks_its_own_algorithm(keys: dict[str, KeyPair]) -> None:
    # RS256 header naming an EdDSA key's id, signed by an RSA key: no key qualifies.
    token = sign(keys["RS256"], claims(subscribe=["abc"]), kid=keys["EdDSA"].kid)
    error = refused(verifier(*keys.values()), token)
    assert error.detail == "no key with the token's key id and algorithm is configured"


def test_unknown_kid_is_refused(keys: dict[str, KeyPair]) -> None:
    token = sign(keys["HS256"], claims(subscribe=["abc"]), kid="someone-else")
    refused(verifier(keys["HS256"]), token)


def test_rotation_two_keys_by_kid() -> None:
    old, new = hs256_key("2024", "o" * 40), hs256_key("2025", "n" * 40)
    check = verifier(old, new)
    assert check.verify(sign(old, claims(subscribe=["a"]))).subscribe == ("a",)
    assert check.verify(sign(new, claims(subscribe=["b"]))).subscribe == ("b",)
    # Without a kid, every key of the header's algorithm is tried.
    assert check.verify(sign(new, claims(subscribe=["c"]), kid=None)).subscribe == ("c",)
    assert verifier(new).verify(sign(new, claims(subscribe=["d"]), kid=None)).subscribe == ("d",)
    refused(verifier(new), sign(old, claims(subscribe=["e"])))


def test_exp_is_required_and_must_be_a_number(keys: dict[str, KeyPair]) -> None:
    key = keys["HS256"]
    check = verifier(key)
    assert refused(check, sign(key, claims(subscribe=["a"], exp=None))).detail == (
        "the token lacks the 'exp' claim"
    )
    for exp in ("soon", [1], True):
        refused(check, sign(key, claims(subscribe=["a"], exp=exp)))


def test_expired_is_told_apart_and_keeps_its_grant(keys: dict[str, KeyPair]) -> None:
    key = keys["ES256"]
    check = verifier(key, leeway_s=0)
    token = sign(key, claims(subscribe=["abc"], ttl_s=-10))
    with pytest.raises(TokenExpired) as caught:
        check.verify(token)
    assert caught.value.status == 401
    assert caught.value.code == "token_expired"
    assert caught.value.grant.covers(Scope.SUBSCRIBE, "abc")
    assert 'error="invalid_token"' in caught.value.headers["WWW-Authenticate"]


def test_leeway_applies_to_exp_nbf_and_iat(keys: dict[str, KeyPair]) -> None:
    key = keys["HS256"]
    now = int(time.time())
    lenient, strict = verifier(key, leeway_s=30), verifier(key, leeway_s=0)
    late = sign(key, claims(subscribe=["a"], exp=now - 10))
    early = sign(key, claims(subscribe=["a"], nbf=now + 10))
    future_iat = sign(key, claims(subscribe=["a"], iat=now + 10))
    for token in (late, early, future_iat):
        lenient.verify(token)
        with pytest.raises(InvalidToken):
            strict.verify(token)
    assert refused(strict, early).detail == "the token is not valid yet"
    assert refused(strict, future_iat).detail == "the token is not valid yet"


def test_audience_and_issuer_are_checked_when_configured(keys: dict[str, KeyPair]) -> None:
    key = keys["EdDSA"]
    check = verifier(key, audience="https://app.example", issuer="auth.example")
    good = claims(subscribe=["a"], aud="https://app.example", iss="auth.example")
    check.verify(sign(key, good))
    check.verify(sign(key, {**good, "aud": ["other", "https://app.example"]}))
    assert refused(check, sign(key, {**good, "aud": "https://evil.example"})).detail == (
        "the token is for another audience"
    )
    assert refused(check, sign(key, {**good, "iss": "evil.example"})).detail == (
        "the token is from another issuer"
    )
    no_aud = {k: v for k, v in good.items() if k != "aud"}
    assert refused(check, sign(key, no_aud)).detail == "the token lacks the 'aud' claim"
    no_iss = {k: v for k, v in good.items() if k != "iss"}
    assert refused(check, sign(key, no_iss)).detail == "the token lacks the 'iss' claim"
    # Not configured: not checked, whatever the token says.
    verifier(key).verify(sign(key, {**good, "aud": "anyone", "iss": "anyone"}))


@pytest.mark.parametrize(
    "scopes",
    [
        [],
        "abc",
        {"subscribe": "abc"},
        {"subscribe": [1]},
        {"subscribe": ["a b"]},
        {"subscribe": ["*abc"]},
        {"subscribe": ["ab*c"]},
        {"subscribe": ["x" * 65]},
        {"publish": [None]},
        {"subscribe": ["a"] * 1001},
    ],
)
def test_a_malformed_sse_claim_is_refused(keys: dict[str, KeyPair], scopes: Any) -> None:
    key = keys["HS256"]
    body = {**claims(), "sse": scopes}
    error = refused(verifier(key), sign(key, body))
    assert "'sse" in error.detail


def test_prefixes_and_exact_ids() -> None:
    grant = Grant(expires_at=0, subscribe=("room-*", "abc"), publish=("*",))
    assert grant.covers(Scope.SUBSCRIBE, "room-1")
    assert grant.covers(Scope.SUBSCRIBE, "room-")
    assert grant.covers(Scope.SUBSCRIBE, "abc")
    assert not grant.covers(Scope.SUBSCRIBE, "abcd")
    assert not grant.covers(Scope.SUBSCRIBE, "ab")
    assert not grant.covers(Scope.SUBSCRIBE, "roo")
    assert not grant.covers(Scope.SUBSCRIBE, "Room-1")
    assert grant.covers(Scope.PUBLISH, "anything")
    # Each scope is its own: publishing rights do not let a token subscribe, nor the reverse.
    assert not Grant(expires_at=0, publish=("*",)).covers(Scope.SUBSCRIBE, "a")
    assert not Grant(expires_at=0, subscribe=("*",)).covers(Scope.PUBLISH, "a")


def test_a_token_without_the_claim_grants_nothing(keys: dict[str, KeyPair]) -> None:
    key = keys["HS256"]
    grant = verifier(key).verify(sign(key, claims(sse=None)))
    assert not grant.covers(Scope.SUBSCRIBE, "a")
    assert not grant.covers(Scope.PUBLISH, "a")


@pytest.mark.parametrize(
    "token",
    ["", ".", "..", "a.b.c", "abc", "a.b", "ü.ü.ü", "\x00", "e30.e30.", "eyJhbGciOiJIUzI1NiJ9"],
)
def test_malformed_tokens_are_refused(keys: dict[str, KeyPair], token: str) -> None:
    refused(verifier(*keys.values()), token)


def test_an_oversized_token_is_refused_before_decoding(keys: dict[str, KeyPair]) -> None:
    key = keys["HS256"]
    token = sign(key, claims(subscribe=["a"], pad="x" * MAX_TOKEN_CHARS))
    assert "longer than" in refused(verifier(key), token).detail


def test_no_key_means_no_token_is_genuine(keys: dict[str, KeyPair]) -> None:
    check = TokenVerifier(KeyRing([]))
    assert not check.has_keys
    refused(check, sign(keys["HS256"], claims(subscribe=["a"])))


def test_errors_never_quote_the_token(keys: dict[str, KeyPair]) -> None:
    key = keys["HS256"]
    check = verifier(key, audience="aud", issuer="iss")
    secret_ish = "SECRETVALUE123"
    bad = [
        sign(key, claims(subscribe=[secret_ish], aud=secret_ish, iss="iss")),
        sign(key, claims(subscribe=[secret_ish], aud="aud", iss=secret_ish)),
        sign(key, claims(subscribe=[secret_ish], aud="aud", iss="iss"), kid=secret_ish),
        raw_token({"alg": secret_ish}, claims()),
        f"{secret_ish}.{secret_ish}.{secret_ish}",
    ]
    for token in bad:
        error = refused(check, token)
        text = error.detail + json.dumps(error.headers)
        assert secret_ish not in text
        assert token not in text


@settings(max_examples=200, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "b64"]),
        st.one_of(
            st.text(max_size=8),
            st.integers(),
            st.booleans(),
            st.lists(st.text(max_size=4), max_size=2),
        ),
        max_size=4,
    ),
    body=st.dictionaries(
        st.sampled_from(["exp", "nbf", "iat", "aud", "iss", "sse"]),
        st.one_of(st.floats(), st.integers(), st.text(max_size=8), st.none()),
        max_size=6,
    ),
    signature=st.binary(max_size=64),
)
def test_any_token_is_either_genuine_or_a_401(
    header: dict[str, Any], body: dict[str, Any], signature: bytes
) -> None:
    check = TokenVerifier(KeyRing([VerifyKey("hs1", "HS256", b"k" * 32)]), audience="a")
    with pytest.raises(InvalidToken):
        check.verify(raw_token(header, body, signature))


@pytest.mark.parametrize("alg", list(KEY_MAKERS))
def test_minted_tokens_verify(keys: dict[str, KeyPair], alg: str) -> None:
    key = keys[alg]
    token = mint_token(
        key.signing, subscribe=["abc", "room-*"], publish=["room-1"], ttl_s=90,
        audience="aud", issuer="iss", now=1_000_000,
    )  # fmt: skip
    header = jwt.get_unverified_header(token)
    assert header["kid"] == key.kid
    assert header["alg"] == alg
    grant = verifier(key, audience="aud", issuer="iss", clock=lambda: 1_000_010).verify(token)
    assert grant == Grant(expires_at=1_000_090, subscribe=("abc", "room-*"), publish=("room-1",))


def test_minting_refuses_bad_patterns(keys: dict[str, KeyPair]) -> None:
    with pytest.raises(ValueError, match="session id"):
        mint_token(keys["HS256"].signing, subscribe=["a b"], ttl_s=10)
