"""Clean up after a real node whose owner died without stopping it
(python -m accord_operator.envtest.janitor spec.json).

Started detached (a session of its own, so a SIGKILL of the test runner or of its process
group does not reach it). It waits for the owner to die; everything in the node's
namespaces dies with the owner (PDEATHSIG, then the PID namespace), so what is left are the
pod cgroups in the host's hierarchies and the run directories. It removes those and exits.
A normal stop does the same cleanup itself and then ends the janitor.

Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_cgroups(roots: list[str], timeout: float = 30.0) -> list[str]:
    """rmdir each cgroup tree bottom-up, killing what still runs in it; returns leftovers."""
    deadline = time.monotonic() + timeout
    left = [r for r in roots if Path(r).exists()]
    while left and time.monotonic() < deadline:
        for root in left:
            for directory, _, _ in sorted(os.walk(root), key=lambda w: -w[0].count("/")):
                with contextlib.suppress(OSError):
                    for line in Path(directory, "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            os.kill(int(line), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        left = [r for r in left if Path(r).exists()]
        if left:
            time.sleep(0.1)
    return left


def cleanup(spec: dict[str, list[str]]) -> list[str]:
    """Undo what a node left on the host; returns what could not be removed."""
    left = remove_cgroups(spec.get("cgroups", []))
    for directory in spec.get("dirs", []):
        shutil.rmtree(directory, ignore_errors=True)
        if Path(directory).exists():
            left.append(directory)
    for path in spec.get("files", []):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return left


def main() -> int:
    spec_path = Path(sys.argv[1])
    owner = int(json.loads(spec_path.read_text())["owner"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the owner stopped cleanly
    while alive(owner):
        time.sleep(0.2)
    # Read again: the owner adds to the spec as the node comes up.
    spec = json.loads(spec_path.read_text())
    # The node's processes die with their owner; give the kernel a moment to tear the
    # namespaces down before removing what they used.
    deadline = time.monotonic() + 10
    while any(alive(int(p)) for p in spec.get("wait_pids", [])) and time.monotonic() < deadline:
        time.sleep(0.1)
    cleanup(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
