"""The house is checked, not hoped for: import contracts (pyproject's [tool.importlinter]:
operator and sidecar independent, no harness in shipped code, handlers -> driver -> machine,
pure modules without I/O), mypy --strict on the pure modules, ruff on everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["lint-imports"],
        ["mypy"],
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
    ],
    ids=["import-contracts", "mypy-strict", "ruff-lint", "ruff-format"],
)
def test_checker_passes(command: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
