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

import yaml

from accord_operator.envtest import ControlPlane, local_service
from accord_operator.envtest.controlplane import die_with_parent, free_port
from accord_operator.envtest.crds import install_crds

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "accord-demo"
# The parallel-booking example is left out: its job step needs a kubelet to run a pod.
EXAMPLES = [
    "saga-order.yaml",
    "saga-order-fails-at-payment.yaml",
    "tpc-transfer.yaml",
    "projection-orders.yaml",
]
SHOP = ("inventory", "payment", "shipping")


def start_shop(cp: ControlPlane, tmp: Path) -> tuple[dict[str, int], list[subprocess.Popen[bytes]]]:
    """The sample participants as local processes, reached through ExternalName Services."""
    ports: dict[str, int] = {}
    procs = []
    for role in SHOP:
        ports[role] = free_port()
        with open(tmp / f"{role}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "examples" / "services" / "shop.py"),
                        "--role",
                        role,
                        "--port",
                        str(ports[role]),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            )
        cp.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(local_service(role)))
    return ports, procs


def manifest(name: str, ports: dict[str, int]) -> str:
    """An example as JSON, its saga steps pointed at the local participants' ports
    (in a cluster they would use the default, the participant sidecar's port 3501)."""
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    steps = doc.get("spec", {}).get("steps", []) if doc["kind"] == "SagaWorkflow" else []
    for saga_step in steps:
        for kind in ("action", "compensation"):
            http = (saga_step.get(kind) or {}).get("http")
            if http and http["service"] in ports:
                http["port"] = ports[http["service"]]
    return json.dumps(doc)


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
                    "--webhook-port",
                    str(free_port()),
                ],
                env={**cp.env(), "ACCORD_METRICS_HOST": "127.0.0.1"},
                preexec_fn=die_with_parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        step("starting the sample participants (inventory, payment, shipping)")
        ports, shop = start_shop(cp, cp.dir)
        try:
            step("applying the examples")
            for name in EXAMPLES:
                print(
                    "    "
                    + cp.kubectl(
                        "apply", "-n", NAMESPACE, "-f", "-", input=manifest(name, ports)
                    ).stdout.strip()
                )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stop.is_set():
                items = json.loads(
                    cp.kubectl("get", "accord", "-n", NAMESPACE, "-o", "json").stdout
                )["items"]
                phases = {
                    i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items
                }
                settled = (
                    phases.get("order-1001") == "Succeeded"
                    and phases.get("order-1002") == "Compensated"
                )
                if len(phases) == len(EXAMPLES) and all(phases.values()) and settled:
                    break
                if operator.poll() is not None:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.5)

            step(f"kubectl get accord -n {NAMESPACE}")
            print(cp.kubectl("get", "accord", "-n", NAMESPACE).stdout)
            step(
                "the declined order compensated: kubectl get events --field-selector "
                "involvedObject.name=order-1002"
            )
            events = json.loads(
                cp.kubectl(
                    "get",
                    "events",
                    "-n",
                    NAMESPACE,
                    "-o",
                    "json",
                    "--field-selector=involvedObject.name=order-1002",
                ).stdout
            )["items"]
            # Timestamps have one-second resolution; resourceVersion orders them exactly.
            print(f"    {'TYPE':<9} {'REASON':<14} MESSAGE")
            for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"])):
                print(f"    {e['type']:<9} {e['reason']:<14} {e['message']}")
            step("what the participants did")
            for role in SHOP:
                for line in (cp.dir / f"{role}.log").read_text().splitlines():
                    print(f"    {line}")
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
            # Stop the children before printing anything: a closed stdout must not leave
            # them running.
            for proc in shop:
                proc.terminate()
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
            step("stopping")
    print("    stopped; nothing left running", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
