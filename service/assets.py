"""The files the service ships beside its code: the default settings and the demo page.

They live at the top of the repository (`config/service.toml`, `web/`), where people look
for them. A wheel carries them as package data under `service/data/` (mapped at build time,
see pyproject.toml), read with importlib.resources so an installed service needs no source
tree; a source checkout, editable install included, reads the top-level folders.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

DEFAULT_CONFIG = "config/service.toml"
WEB_FILES_DIR = "web"

_SOURCE_TREE = Path(__file__).resolve().parent.parent


class MissingAsset(FileNotFoundError):
    """A shipped file is in neither the installed package nor the source tree."""


def asset(relative: str) -> Traversable:
    """The shipped file or folder `relative` (e.g. "web/app.js"), installed copy first."""
    packaged = resources.files(__package__ or "service") / "data"
    for part in relative.split("/"):
        packaged = packaged / part
    if packaged.is_file() or packaged.is_dir():
        return packaged
    checkout = _SOURCE_TREE / relative
    if checkout.exists():
        return checkout
    raise MissingAsset(
        f"{relative} is missing: neither the installed package (service/data/) nor a source "
        "tree holds it; reinstall sse-fanout"
    )


def read_asset(relative: str) -> bytes:
    """The bytes of the shipped file `relative`."""
    return asset(relative).read_bytes()
