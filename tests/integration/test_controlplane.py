"""The local control plane stops cleanly: no orphan processes, no temp dirs, even when killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from accord_operator.envtest.controlplane import reap_stale_dirs
from tests.support.cluster import Cluster


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


def _start() -> tuple[subprocess.Popen[str], Path, set[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord_operator.envtest"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    kubeconfig = None
    for line in proc.stdout:
        if line.startswith("KUBECONFIG="):
            kubeconfig = Path(line.strip().split("=", 1)[1])
            break
    assert kubeconfig is not None and kubeconfig.exists(), proc.stderr.read() if proc.stderr else ""
    children = _children(proc.pid)
    assert len(children) == 3, children  # etcd, kube-apiserver, kube-controller-manager
    return proc, kubeconfig.parent, children


def test_ctrl_c_stops_everything_and_removes_the_temp_dir(cluster: Cluster) -> None:
    # `cluster` is requested only so this runs after the binaries are known to exist.
    proc, tmp, children = _start()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert _wait_gone(children) == set()
    assert not tmp.exists()


def test_killed_runner_leaves_no_orphans_and_its_dir_is_reaped(cluster: Cluster) -> None:
    proc, tmp, children = _start()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _wait_gone(children) == set(), "control-plane processes outlived their parent"
    assert tmp.exists()  # nobody could clean up after SIGKILL...
    reap_stale_dirs()  # ...so the next start does
    assert not tmp.exists()
