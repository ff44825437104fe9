"""python -m accord_operator.envtest: run a local control plane until Ctrl-C.

Prints the kubeconfig path; with --crds, installs the CRDs and waits until Established;
with --node, adds a real node (kubelet, containerd, CNI, kube-proxy, scheduler, DNS) and
imports Accord's images built by hack/build-images.sh.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from accord_operator.envtest.binaries import find_binaries
from accord_operator.envtest.controlplane import ControlPlane
from accord_operator.envtest.crds import install_crds
from accord_operator.envtest.node import LocalCluster


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m accord_operator.envtest")
    parser.add_argument("--crds", type=Path, help="install the CRDs in this directory")
    parser.add_argument("--kubeconfig-out", type=Path, help="also copy the kubeconfig here")
    parser.add_argument("--node", action="store_true", help="add a real node (root only)")
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    started = time.monotonic()
    binaries = find_binaries()
    cluster: ControlPlane | LocalCluster
    if args.node:
        from accord_operator.envtest.images import build_images

        images = build_images()
        cluster = LocalCluster(binaries)
    else:
        cluster = ControlPlane(binaries)
    with cluster as cp:
        what = "control plane and node" if args.node else "control plane"
        print(f"{what} up in {time.monotonic() - started:.1f}s ({binaries.source})", flush=True)
        if isinstance(cp, LocalCluster):
            cp.import_images(images.values())
            print(f"images imported: {', '.join(i.ref for i in images.values())}", flush=True)
            print(f"node run {cp.id} in {cp.dir}", flush=True)
        if args.crds:
            install_crds(cp, args.crds)
            print(f"CRDs from {args.crds} Established", flush=True)
        if args.kubeconfig_out:
            args.kubeconfig_out.write_text(cp.kubeconfig.read_text())
            args.kubeconfig_out.chmod(0o600)
        print(f"KUBECONFIG={args.kubeconfig_out or cp.kubeconfig}", flush=True)
        stop.wait()
    print("control plane stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
