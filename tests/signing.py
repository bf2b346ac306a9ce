"""Keys and tokens for tests: one key of each algorithm, PEM files, JWKS documents, raw JWTs."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.token_keys import SigningKey

HS_SECRET = "hs256-test-secret-0123456789abcdef"  # 34 bytes


@dataclass(frozen=True)
class KeyPair:
    """A signing key and how its public half is configured."""

    signing: SigningKey

    @property
    def kid(self) -> str:
        return self.signing.kid

    @property
    def alg(self) -> str:
        return self.signing.alg

    def public_pem(self) -> bytes:
        return bytes(
            self.signing.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def private_pem(self) -> bytes:
        return bytes(
            self.signing.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def public_jwk(self) -> dict[str, Any]:
        if self.alg == "HS256":
            jwk = json.loads(jwt.algorithms.HMACAlgorithm.to_jwk(self.signing.key))
        else:
            algorithm = jwt.get_algorithm_by_name(self.alg)
            jwk = json.loads(algorithm.to_jwk(self.signing.key.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.alg}

    def write_public_pem(self, directory: Path) -> Path:
        path = directory / f"{self.kid}.pem"
        path.write_bytes(self.public_pem())
        return path

    def config_entry(self, directory: Path) -> str:
        """This key as a `token_public_keys` entry."""
        return f"{self.kid}:{self.alg}:{self.write_public_pem(directory)}"


def hs256_key(kid: str = "hs1", secret: str = HS_SECRET) -> KeyPair:
    return KeyPair(SigningKey(kid, "HS256", secret.encode()))


def rsa_key(kid: str = "rsa1", bits: int = 2048) -> KeyPair:
    return KeyPair(SigningKey(kid, "RS256", rsa.generate_private_key(65537, bits)))


def ec_key(kid: str = "ec1") -> KeyPair:
    return KeyPair(SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1())))


def ed_key(kid: str = "ed1") -> KeyPair:
    return KeyPair(SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate()))


def jwks(*keys: KeyPair) -> str:
    return json.dumps({"keys": [key.public_jwk() for key in keys]})


def claims(
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    ttl_s: float = 60,
    **extra: Any,
) -> dict[str, Any]:
    """Claims of the service's shape; `extra` adds or (with None) removes registered claims."""
    now = int(time.time())
    scopes: dict[str, list[str]] = {}
    if subscribe is not None:
        scopes["subscribe"] = subscribe
    if publish is not None:
        scopes["publish"] = publish
    body: dict[str, Any] = {"sse": scopes, "iat": now, "exp": now + ttl_s}
    for name, value in extra.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def sign(key: KeyPair, body: dict[str, Any], **headers: Any) -> str:
    """A token signed by `key`, with its kid unless `headers` say otherwise (kid=None: none)."""
    header: dict[str, Any] = {"kid": key.kid, **headers}
    if header["kid"] is None:
        del header["kid"]
    return jwt.encode(body, key.signing.key, algorithm=key.alg, headers=header)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand: any header, any body, any signature bytes."""
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(body).encode()), b64(signature)]
    )
