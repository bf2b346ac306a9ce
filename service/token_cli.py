"""`sse-fanout token`: mint an access token, as a backend would, for scripts and trials.

It signs with an HS256 secret of the settings (`token_hs256_secrets`, the first one or the
one named by `--kid`) or with a private key file (`--key`, RSA, EC P-256 or Ed25519), and
puts the settings' `token_audience` and `token_issuer` in, so the token is one this
deployment accepts. It prints the token and nothing else.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from .settings import SettingsError, load_settings
from .token_keys import SigningKey, signing_key_from_pem, signing_key_from_settings
from .tokens import is_session_pattern, mint_token

_DURATION = re.compile(r"([0-9]{1,7})([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 366 * 86400


def parse_duration_s(text: str) -> int:
    """`90`, `90s`, `10m`, `2h` or `7d` in seconds; ValueError for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 10m, 2h, 7d)")
    seconds = int(match[1]) * _UNIT_S[match[2]]
    if not 1 <= seconds <= MAX_TTL_S:
        raise ValueError(f"the duration must be from 1 s to {MAX_TTL_S // 86400} days")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sse-fanout token",
        description="Print a signed access token for one or more sessions.",
    )
    parser.add_argument(
        "--session", action="append", required=True, metavar="ID",
        help="a session id, or an id prefix ending in '*' ('*': every session); repeatable",
    )  # fmt: skip
    parser.add_argument("--ttl", default="10m", help="lifetime, e.g. 30s, 10m, 2h (default 10m)")
    parser.add_argument(
        "--publish", action="store_true",
        help="grant publishing to the sessions (instead of subscribing, unless --subscribe)",
    )  # fmt: skip
    parser.add_argument("--subscribe", action="store_true", help="grant subscribing (the default)")
    parser.add_argument(
        "--key", type=Path, metavar="PEM",
        help="sign with this private key file instead of an HS256 secret of the settings",
    )  # fmt: skip
    parser.add_argument(
        "--kid", help="the key id: which HS256 secret to use, or the id of the --key file"
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    return parser


def mint_command(argv: list[str], environ: Mapping[str, str]) -> int:
    """Run `sse-fanout token ARGS`; print the token; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        for pattern in args.session:
            if not is_session_pattern(pattern):
                raise ValueError(
                    f"--session {pattern!r}: a session id (1-64 of A-Z, a-z, 0-9, '_', '-') "
                    "or a prefix of one ending in '*'"
                )
        ttl_s = parse_duration_s(args.ttl)
        if args.key is not None and not args.kid:
            raise ValueError("--key needs --kid: the key id verifiers know the key by")
        settings = (
            load_settings(environ=environ)
            if args.config is None
            else load_settings(args.config, environ)
        )
        key: SigningKey = (
            signing_key_from_pem(args.key, args.kid)
            if args.key is not None
            else signing_key_from_settings(settings, args.kid)
        )
    except (ValueError, SettingsError) as error:
        print(f"sse-fanout token: {error}", file=sys.stderr)
        return 2
    subscribe = args.subscribe or not args.publish
    token = mint_token(
        key,
        subscribe=args.session if subscribe else (),
        publish=args.session if args.publish else (),
        ttl_s=ttl_s,
        audience=settings.token_audience,
        issuer=settings.token_issuer,
    )
    print(token)
    return 0
