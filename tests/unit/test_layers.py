"""The house is checked, not hoped for: import contracts (pyproject's [tool.importlinter]:
operator and sidecar independent, no harness in shipped code, handlers -> driver -> machine,
pure modules without I/O), mypy --strict on the pure modules, ruff on everything."""

from __future__ import annotations

import subprocess
import sys
import zipfile
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


def test_the_wheel_ships_no_test_harness(tmp_path: Path) -> None:
    """The local control plane (accord_operator.envtest) runs from the source tree only;
    the wheel, and so the operator image built from it, carries shipped code alone."""
    src = tmp_path / "src"  # a copy, so no build/ directory lands in the repository
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    result = subprocess.run(
        [str(BIN / "pip"), "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("accord-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "accord_operator/saga/machine.py" in names and "accord_sidecar/server.py" in names
    assert [n for n in names if "envtest" in n] == []
