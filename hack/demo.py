"""The Accord demo: a local control plane, the CRDs, the operator, the examples.

Run through hack/demo.sh (which sets things up first). Ctrl-C stops everything cleanly;
--once stops right after printing `kubectl get accord`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from accord_operator.envtest import ControlPlane
from accord_operator.envtest.controlplane import free_port
from accord_operator.envtest.crds import install_crds

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "accord-demo"
EXAMPLES = [
    "saga-order.yaml",
    "saga-order-fails-at-payment.yaml",
    "saga-parallel-booking.yaml",
    "tpc-transfer.yaml",
    "projection-orders.yaml",
]


def step(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--once", action="store_true", help="stop after printing the resources")
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    started = time.monotonic()
    step("starting etcd and kube-apiserver on loopback")
    with ControlPlane() as cp:
        print(f"    up in {time.monotonic() - started:.1f}s, API server {cp.server}")
        step("installing the CRDs")
        for name in install_crds(cp, ROOT / "crds"):
            print(f"    {name} Established")
        cp.kubectl("create", "namespace", NAMESPACE)

        step("running accord-operator")
        assert cp.dir is not None
        log_path = cp.dir / "operator.log"
        metrics_port = free_port()
        with open(log_path, "wb") as log:
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "accord_operator",
                    "run",
                    "-n",
                    NAMESPACE,
                    "--metrics-port",
                    str(metrics_port),
                ],
                env={**cp.env(), "ACCORD_METRICS_HOST": "127.0.0.1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            step("applying the examples")
            for name in EXAMPLES:
                print(
                    "    "
                    + cp.kubectl(
                        "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / name)
                    ).stdout.strip()
                )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stop.is_set():
                items = json.loads(
                    cp.kubectl("get", "accord", "-n", NAMESPACE, "-o", "json").stdout
                )["items"]
                if items and all((i.get("status") or {}).get("phase") for i in items):
                    break
                if operator.poll() is not None:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.5)

            step(f"kubectl get accord -n {NAMESPACE}")
            print(cp.kubectl("get", "accord", "-n", NAMESPACE).stdout)
            if not args.once:
                print(
                    f"The cluster stays up. In another shell:\n"
                    f"    export KUBECONFIG={cp.kubeconfig}\n"
                    f"    kubectl get accord -n {NAMESPACE}\n"
                    f"    kubectl explain sagaworkflow.spec.steps\n"
                    f"Operator metrics: http://127.0.0.1:{metrics_port}/metrics\n"
                    f"Press Ctrl-C to stop.",
                    flush=True,
                )
                stop.wait()
        finally:
            step("stopping")
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
    print("    stopped; nothing left running", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
