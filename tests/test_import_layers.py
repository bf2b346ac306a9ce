"""The layering of service/ holds: pyproject.toml's import contracts, checked by lint-imports.

CI runs `lint-imports` before the suite as well; checking here means the test command alone
refuses an upward import or an import cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_import_contracts_in_pyproject_hold() -> None:
    # A venv made before import-linter joined the test extra lacks it; CI's never does.
    pytest.importorskip("importlinter", reason="import-linter is not installed (test extra)")
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
