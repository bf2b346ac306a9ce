"""The keys that verify and sign access tokens: from settings, from a JWKS file, for the demo.

Every key is pinned to one algorithm (HS256, RS256, ES256 or EdDSA) when it is loaded, and a
token is only ever checked with keys of the algorithm its header names. So `alg: none` finds
no key, and an HS256 token "signed" with an RSA public key used as the HMAC secret (the
classic algorithm confusion) finds only HS256 keys, none of which is that public key.

A JWKS file is re-read when its modification time, size or inode change; that is checked with
one `stat` at most every `token_jwks_check_s`, so a request never reads the file. A rewrite
that does not parse keeps the last good keys (and says so in the log), so a half-written file
cannot lock everyone out; write the new version to a temporary file and rename it over the old.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .settings import (
    KEY_ID_PATTERN,
    MIN_HS256_SECRET_BYTES,
    KeyEntry,
    Settings,
    SettingsError,
    key_entries,
)

log = logging.getLogger(__name__)

ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
MIN_RSA_BITS = 2048
# The key the embedded single-process mode mints demo tokens with; see demo_token.py.
DEMO_KEY_ID = "embedded-demo"

# What a loaded key is: an HMAC secret, or a public key (to verify) or private key (to sign).
KeyMaterial = Any


class KeyConfigError(SettingsError):
    """A configured key cannot be used; the message names the setting or file and the key id."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key that verifies tokens of exactly one algorithm."""

    kid: str
    alg: str
    key: KeyMaterial = field(repr=False)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key that signs tokens, with the `kid` put in their header."""

    kid: str
    alg: str
    key: KeyMaterial = field(repr=False)


class KeyRing:
    """The keys a worker trusts now: the configured ones, plus a JWKS file's latest version."""

    def __init__(self, static: list[VerifyKey], jwks: JwksFile | None = None) -> None:
        self._static = {key.kid: key for key in static}
        self._jwks = jwks

    @property
    def empty(self) -> bool:
        """True when no key at all is configured."""
        return not self._static and self._jwks is None

    def candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        """The keys a token with header `kid` and `alg` may be checked with.

        With a `kid`, that key if its algorithm is `alg`; without one, every key of `alg`.
        """
        keys: Mapping[str, VerifyKey] = self._static
        if self._jwks is not None:
            keys = {**self._jwks.keys(), **self._static}
        if kid is not None:
            key = keys.get(kid)
            return [key] if key is not None and key.alg == alg else []
        return [key for key in keys.values() if key.alg == alg]


def load_key_ring(settings: Settings, extra: list[VerifyKey] | None = None) -> KeyRing:
    """Read every configured key (PEM files, the JWKS file); raise KeyConfigError if one is bad."""
    # The configured keys come last, so they win over an extra key with the same id.
    static = [*(extra or []), *(_load_entry(entry) for entry in key_entries(settings))]
    jwks = None
    if settings.token_jwks_path:
        jwks = JwksFile(Path(settings.token_jwks_path), settings.token_jwks_check_s)
        overlap = sorted(set(jwks.keys()) & {key.kid for key in static})
        if overlap:
            log.warning(
                "key ids %s are both configured and in the JWKS file; the configured keys win",
                overlap,
            )
    return KeyRing(static, jwks)


def new_demo_key() -> SigningKey:
    """A random HS256 key that lives as long as the process: the embedded mode's demo key."""
    return SigningKey(DEMO_KEY_ID, "HS256", secrets.token_bytes(MIN_HS256_SECRET_BYTES))


def verify_key_of(signing: SigningKey) -> VerifyKey:
    """The key that verifies what `signing` signs."""
    if signing.alg == "HS256":
        return VerifyKey(signing.kid, signing.alg, signing.key)
    return VerifyKey(signing.kid, signing.alg, signing.key.public_key())


def _load_entry(entry: KeyEntry) -> VerifyKey:
    if entry.alg == "HS256":
        return VerifyKey(entry.kid, "HS256", entry.value.encode())
    where = f"setting 'token_public_keys', key {entry.kid!r}"
    try:
        data = Path(entry.value).read_bytes()
    except OSError as error:
        raise KeyConfigError(f"{where}: cannot read {entry.value}: {error.strerror}") from None
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise KeyConfigError(f"{where}: {entry.value} is not a PEM public key ({error})") from None
    _check_key_type(public, entry.alg, where)
    return VerifyKey(entry.kid, entry.alg, public)


def _check_key_type(key: object, alg: str, where: str) -> None:
    """Refuse a key that does not belong to `alg` (or is too weak for it)."""
    if alg == "RS256":
        ok = isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS
        need = f"an RSA key of at least {MIN_RSA_BITS} bits"
    elif alg == "ES256":
        ok = isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and (
            isinstance(key.curve, ec.SECP256R1)
        )
        need = "an EC key on P-256"
    elif alg == "EdDSA":
        ok = isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey)
        need = "an Ed25519 key"
    else:
        ok, need = False, f"one of {ALGORITHMS}"
    if not ok:
        raise KeyConfigError(f"{where}: {alg} needs {need}")


def parse_jwks(data: bytes, where: str) -> dict[str, VerifyKey]:
    """The signature keys of a JWKS document, by kid; raise KeyConfigError for any bad entry.

    A bad entry fails the whole document, so a typo never silently drops one key.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise KeyConfigError(f"{where} is not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyConfigError(f'{where} must be a JSON object {{"keys": [...]}}')
    keys: dict[str, VerifyKey] = {}
    for index, jwk in enumerate(document["keys"]):
        key = _parse_jwk(jwk, f"{where}, keys[{index}]")
        if key is None:
            continue
        if key.kid in keys:
            raise KeyConfigError(f"{where}: key id {key.kid!r} appears twice")
        keys[key.kid] = key
    return keys


def _parse_jwk(jwk: object, where: str) -> VerifyKey | None:
    if not isinstance(jwk, dict):
        raise KeyConfigError(f"{where} must be a JSON object")
    if jwk.get("use", "sig") != "sig":
        return None  # an encryption key has no business here; not ours to judge
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not KEY_ID_PATTERN.fullmatch(kid):
        raise KeyConfigError(f"{where} needs a 'kid' of 1-64 of A-Z, a-z, 0-9, '.', '_', '-'")
    where = f"{where} (kid {kid!r})"
    alg = jwk.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        raise KeyConfigError(f"{where}: 'alg' must be one of {ALGORITHMS}")
    if jwk.get("kty") != "oct" and "d" in jwk:
        raise KeyConfigError(f"{where} holds a private key; publish only the public part")
    try:
        parsed = jwt.PyJWK(jwk, alg)
    except jwt.PyJWTError as error:
        raise KeyConfigError(f"{where}: {error}") from None
    if parsed.algorithm_name not in ALGORITHMS:
        raise KeyConfigError(f"{where}: keys of algorithm {parsed.algorithm_name} are not used")
    if parsed.algorithm_name == "HS256":
        if len(parsed.key) < MIN_HS256_SECRET_BYTES:
            raise KeyConfigError(f"{where}: an HS256 secret needs {MIN_HS256_SECRET_BYTES} bytes")
    else:
        _check_key_type(parsed.key, parsed.algorithm_name, where)
    return VerifyKey(kid, parsed.algorithm_name, parsed.key)


class JwksFile:
    """A JWKS file's keys, re-read when the file changes (checked at most every interval)."""

    def __init__(
        self,
        path: Path,
        check_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Read the file now; raise KeyConfigError if it is missing or invalid."""
        self._path = path
        self._interval_s = check_interval_s
        self._clock = clock
        self._where = f"JWKS file {path}"
        try:
            self._stamp = _stamp(path)
            self._keys = parse_jwks(path.read_bytes(), self._where)
        except OSError as error:
            raise KeyConfigError(
                f"setting 'token_jwks_path': cannot read {path}: {error.strerror}"
            ) from None
        self._next_check = clock() + check_interval_s
        self._missing_logged = False

    def keys(self) -> Mapping[str, VerifyKey]:
        """The keys of the file's last good version."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._interval_s
            self._refresh()
        return self._keys

    def _refresh(self) -> None:
        try:
            stamp = _stamp(self._path)
        except OSError as error:
            if not self._missing_logged:
                log.warning(
                    "%s cannot be read (%s); keeping its %d keys of the last version",
                    self._where,
                    error.strerror,
                    len(self._keys),
                )
                self._missing_logged = True
            return
        self._missing_logged = False
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = parse_jwks(self._path.read_bytes(), self._where)
        except OSError as error:
            log.warning(
                "%s cannot be read (%s); keeping the last version's keys",
                self._where,
                error.strerror,
            )
            return
        except KeyConfigError as error:
            log.warning(
                "%s changed but is not valid, keeping the last version's keys: %s",
                self._where,
                error,
            )
            return
        log.info("%s reloaded: key ids %s", self._where, sorted(keys))
        self._keys = keys


def _stamp(path: Path) -> tuple[int, int, int]:
    status = os.stat(path)
    return status.st_mtime_ns, status.st_size, status.st_ino


def signing_key_from_settings(settings: Settings, kid: str | None = None) -> SigningKey:
    """The HS256 secret named `kid` (or the first one) of `token_hs256_secrets`."""
    for entry in key_entries(settings):
        if entry.alg == "HS256" and kid in (None, entry.kid):
            return SigningKey(entry.kid, "HS256", entry.value.encode())
    wanted = f" with key id {kid!r}" if kid else ""
    raise KeyConfigError(f"no HS256 secret{wanted} is configured (token_hs256_secrets)")


def signing_key_from_pem(path: Path, kid: str) -> SigningKey:
    """A private key file (RSA, EC P-256 or Ed25519); its type chooses the algorithm."""
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise KeyConfigError(f"cannot read {path}: {error.strerror}") from None
    except (ValueError, TypeError) as error:
        raise KeyConfigError(f"{path} is not an unencrypted PEM private key ({error})") from None
    alg = {
        rsa.RSAPrivateKey: "RS256",
        ec.EllipticCurvePrivateKey: "ES256",
        ed25519.Ed25519PrivateKey: "EdDSA",
    }
    for kind, name in alg.items():
        if isinstance(private, kind):
            _check_key_type(private, name, str(path))
            return SigningKey(kid, name, private)
    raise KeyConfigError(f"{path}: only RSA, EC P-256 and Ed25519 keys can sign tokens")
