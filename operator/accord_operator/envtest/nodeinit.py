"""PID 1 of a real node's own PID and mount namespaces (python -m ...nodeinit spec.json).

Started by accord_operator.envtest.node under `unshare --mount --pid --fork --kill-child
--mount-proc --propagation private` inside the node's network namespace. It makes the mount
namespace the node needs without touching the host, then runs containerd, the kubelet and
kube-proxy and reaps every orphan (containerd's shims re-parent to us). When it dies, the
kernel kills everything in the PID namespace and drops every mount with the namespace:
one SIGKILL of the unshare process ends the whole node.

Stdlib only: it runs before anything else exists.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"nodeinit: {message}", flush=True)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def prepare(spec: dict[str, object], base: Path) -> None:
    # A fresh /run: containerd's shims put their sockets under /run/containerd (hard-coded),
    # iptables its lock; none of it may land on the host.
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    # And a fresh /var/lib: libcni caches results in /var/lib/cni and the kubelet keeps its
    # device-plugin socket in /var/lib/kubelet, whatever their configured directories say.
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/lib")
    # The kubelet sets these kernel knobs host-wide; give it files of its own to write.
    values = spec["kernel_files"]
    assert isinstance(values, dict)
    for i, (path, value) in enumerate(sorted(values.items())):
        stand_in = base / f"sysctl-{i}"
        stand_in.write_text(f"{value}\n")
        mount("--bind", str(stand_in), path)
    # Network namespace knobs: they live and die with the node's network namespace.
    sysctls = spec["net_sysctls"]
    assert isinstance(sysctls, dict)
    for key, value in sysctls.items():
        Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"containerd did not open {path} in {timeout}s")
        time.sleep(0.05)


def main() -> int:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    base = spec_path.parent
    prepare(spec, base)
    env = {**os.environ, "PATH": str(spec["path"])}
    daemons: dict[int, str] = {}
    for entry in spec["daemons"]:
        name, argv = entry["name"], entry["argv"]
        with open(base / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        daemons[proc.pid] = name
        log(f"started {name} (pid {proc.pid})")
        if entry.get("socket"):
            wait_for_socket(Path(entry["socket"]), proc)
    (base / "nodeinit.ready").write_text("ok")

    def stop(*_: object) -> None:
        raise SystemExit(0)  # leaving PID 1 kills the whole namespace

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Reap every child, ours and orphans; a daemon that dies is logged, not restarted.
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid in daemons:
            log(f"{daemons.pop(pid)} exited with status {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    raise SystemExit(main())
