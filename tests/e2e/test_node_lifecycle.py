"""The real node leaves the host as it found it: after Ctrl-C, and after a SIGKILL of the
process that owns it, with a pod running (containers, shims, pod cgroups, a pod netns)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accord_operator.envtest.binaries import REPO_ROOT

pytestmark = pytest.mark.e2e

OWNER = """
import json, sys, time
from accord_operator.envtest.images import build_images
from accord_operator.envtest.node import LocalCluster
images = build_images("samples")
c = LocalCluster().start()
c.import_images(images.values())
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": "default"},
       "spec": {"containers": [{"name": "s", "image": images["samples"].ref,
                "imagePullPolicy": "Never", "args": ["-c", "import time; time.sleep(600)"]}]}}
c.kubectl("apply", "-f", "-", input=json.dumps(pod))
c.kubectl("wait", "pod/sleeper", "--for=condition=Ready", "--timeout=120s")
print(json.dumps({"id": c.id, "dirs": [str(c.dir), str(c.cp.dir)]}), flush=True)
time.sleep(600)
"""


# Paths components write by default whatever their configuration says; a node of ours must
# not create them on the host.
HOST_PATHS = [
    Path(p)
    for p in ("/var/lib/kubelet", "/var/lib/cni", "/var/lib/containerd", "/etc/cni",
              "/run/containerd", "/run/netns", "/run/xtables.lock", "/var/log/pods",
              "/var/log/containers", "/etc/kubernetes", "/opt/cni")
]  # fmt: skip


def host_state() -> dict[Path, bool]:
    return {p: p.exists() for p in HOST_PATHS}


def traces(run_id: str, dirs: list[str]) -> list[str]:
    """What of this node is still on the host: processes, mounts, cgroups, links, files."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(d in cmdline for d in dirs) or f"acc{run_id}" in cmdline:
            found.append(f"process {proc.name}: {cmdline[:120]}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount of {d}" for d in dirs if d in mounts]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"*/accord-{run_id}")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link acc{run_id}h" for _ in [1] if f"acc{run_id}h" in links]
    found += [f"dir {d}" for d in dirs if Path(d).exists()]
    found += [f"file {p}" for p in Path("/tmp").glob(f"accord-janitor-{run_id}.json")]
    return found


def start_owner() -> tuple[subprocess.Popen[str], dict[str, object]]:
    import json

    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the node did not start (exit {proc.wait()})"
    return proc, json.loads(line)


def wait_clean(run_id: str, dirs: list[str], timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    left = traces(run_id, dirs)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = traces(run_id, dirs)
    return left


def test_a_sigkilled_owner_leaves_nothing_behind() -> None:
    before = host_state()
    proc, info = start_owner()
    assert host_state() == before  # not even while it runs
    run_id, dirs = str(info["id"]), [str(d) for d in info["dirs"]]  # type: ignore[attr-defined]
    assert traces(run_id, dirs), "the node should be visible while it runs"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its whole process group
    proc.wait()
    assert wait_clean(run_id, dirs) == []
    assert host_state() == before


def test_ctrl_c_stops_the_cluster_command_cleanly() -> None:
    before = host_state()
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord_operator.envtest", "--node"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    run_id, dirs = "", []
    for line in proc.stdout:
        if line.startswith("node run "):  # node run <id> in <dir>
            run_id, dirs = line.split()[2], [line.split()[4]]
        if line.startswith("KUBECONFIG="):
            dirs.append(str(Path(line.strip().split("=", 1)[1]).parent))
            break
    assert run_id and traces(run_id, dirs)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    # A clean stop cleans up itself (the kernel may take a moment to reap the PID namespace).
    assert wait_clean(run_id, dirs, timeout=10) == []
    assert host_state() == before
