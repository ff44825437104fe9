"""The Accord demo: a local control plane, the CRDs, the operator, the examples.

Run through hack/demo.sh (which sets things up first). Ctrl-C stops everything cleanly;
--once stops right after printing `kubectl get accord`. --real-node runs it the way it runs
in a cluster: a real node, Accord's images built here, the Helm chart, participants as pods
with the sidecar injected.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from accord_operator.envtest import ControlPlane, incluster, local_service
from accord_operator.envtest.controlplane import die_with_parent, free_port
from accord_operator.envtest.crds import install_crds
from accord_operator.envtest.node import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "accord-demo"
# The parallel-booking example is left out: its job step needs a kubelet to run a pod.
EXAMPLES = [
    "saga-order.yaml",
    "saga-order-fails-at-payment.yaml",
    "tpc-transfer.yaml",
    "tpc-transfer-overdraft.yaml",
    "projection-orders.yaml",
]
SHOP = ("inventory", "payment", "shipping")
LEDGERS = ("ledger-a", "ledger-b")
LEDGER_TOKEN = "demo-participant-token"  # what the operator shows the ledgers' sidecars
SETTLED = {
    "order-1001": "Succeeded",
    "order-1002": "Compensated",
    "transfer-5001": "Committed",
    "transfer-5002": "Aborted",
}


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


def start_ledgers(
    cp: ControlPlane, tmp: Path
) -> tuple[dict[str, int], list[subprocess.Popen[bytes]]]:
    """The 2PC participants: two ledgers (each its own SQLite file) behind real sidecars
    (the fence), reached through ExternalName Services. alice starts with 100.00."""
    ports: dict[str, int] = {}
    procs = []
    for name in LEDGERS:
        app_port, inbound = free_port(), free_port()
        ports[name] = inbound
        with open(tmp / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "services" / "ledger.py"),
                 "--port", str(app_port), "--db", str(tmp / f"{name}.db"), "--name", name],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            ))  # fmt: skip
        with open(tmp / f"{name}-sidecar.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "accord_sidecar"],
                env={**os.environ, "ACCORD_APP_PORT": str(app_port),
                     "ACCORD_INBOUND_PORT": str(inbound), "ACCORD_HTTP_PORT": str(free_port()),
                     "ACCORD_ADMIN_PORT": str(free_port()), "ACCORD_BIND_HOST": "127.0.0.1",
                     "ACCORD_SHARED_TOKEN": LEDGER_TOKEN, "ACCORD_APP_ID": name,
                     "ACCORD_DATA_DIR": str(tmp / f"{name}-sidecar")},
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            ))  # fmt: skip
        _wait_http(f"http://127.0.0.1:{app_port}/_state")
        if name == "ledger-a":
            body = json.dumps({"account": "alice", "amountCents": 10_000}).encode()
            urllib.request.urlopen(f"http://127.0.0.1:{app_port}/_deposit", body, timeout=5)
        cp.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(local_service(name)))
    return ports, procs


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def manifest(name: str, ports: dict[str, int]) -> str:
    """An example as JSON, its saga steps and transaction participants pointed at the local
    participants' ports (in a cluster they use the default, the sidecar's port 3501)."""
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    steps = doc.get("spec", {}).get("steps", []) if doc["kind"] == "SagaWorkflow" else []
    for saga_step in steps:
        for kind in ("action", "compensation"):
            http = (saga_step.get(kind) or {}).get("http")
            if http and http["service"] in ports:
                http["port"] = ports[http["service"]]
    if doc["kind"] == "TwoPhaseTransaction":
        for p in doc["spec"]["participants"]:
            if p["service"] in ports:
                p["port"] = ports[p["service"]]
    return json.dumps(doc)


def step(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--once", action="store_true", help="stop after printing the resources")
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="run on a real node: the chart, our images, participants as pods (root only)",
    )
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    if args.real_node:
        return real_node(args.once, stop)

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
                env={
                    **cp.env(),
                    "ACCORD_METRICS_HOST": "127.0.0.1",
                    "ACCORD_PARTICIPANT_TOKEN": LEDGER_TOKEN,
                },
                preexec_fn=die_with_parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        step("starting the sample participants (inventory, payment, shipping; two ledgers)")
        ports, shop = start_shop(cp, cp.dir)
        ledger_ports, ledgers = start_ledgers(cp, cp.dir)
        ports.update(ledger_ports)
        shop += ledgers
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
                settled = all(phases.get(n) == p for n, p in SETTLED.items())
                if len(phases) == len(EXAMPLES) and all(phases.values()) and settled:
                    break
                if operator.poll() is not None:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.5)

            print_resources(cp)
            step("what the participants did")
            for role in (*SHOP, *LEDGERS):
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


def print_resources(cluster: ControlPlane | LocalCluster) -> None:
    step(f"kubectl get accord -n {NAMESPACE}")
    print(cluster.kubectl("get", "accord", "-n", NAMESPACE).stdout)
    step(
        "the declined order compensated: kubectl get events --field-selector "
        "involvedObject.name=order-1002"
    )
    events = json.loads(
        cluster.kubectl(
            "get", "events", "-n", NAMESPACE, "-o", "json",
            "--field-selector=involvedObject.name=order-1002",
        ).stdout
    )["items"]  # fmt: skip
    # Timestamps have one-second resolution; resourceVersion orders them exactly.
    print(f"    {'TYPE':<9} {'REASON':<14} MESSAGE")
    for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"])):
        print(f"    {e['type']:<9} {e['reason']:<14} {e['message']}")


def wait_settled(cluster: ControlPlane | LocalCluster, stop: threading.Event) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stop.is_set():
        items = json.loads(cluster.kubectl("get", "saga", "-n", NAMESPACE, "-o", "json").stdout)
        phases = {
            i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items["items"]
        }
        if phases.get("order-1001") == "Succeeded" and phases.get("order-1002") == "Compensated":
            return
        time.sleep(0.5)


def order_summary(cluster: LocalCluster, samples: str, stop: threading.Event) -> None:
    """The read side: examples/projection-order-summary.yaml, fed by the events the
    participants published for each saga call, queried through the projection's Service."""
    step("the order-summary projection: the participants' events, read through its Service")
    proj = yaml.safe_load((ROOT / "examples" / "projection-order-summary.yaml").read_text())
    proj["spec"]["projector"].update(image=samples, imagePullPolicy="Never")
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(proj))
    deadline = time.monotonic() + 180
    status: dict[str, object] = {}
    while time.monotonic() < deadline and not stop.is_set():
        got = json.loads(cluster.kubectl("get", "proj", "order-summary", "-n", NAMESPACE,
                                         "-o", "json").stdout)  # fmt: skip
        status = got.get("status") or {}
        if status.get("phase") == "Live" and int(str(status.get("eventsProcessed", 0))) >= 6:
            break
        time.sleep(1)
    print(cluster.kubectl("get", "proj", "-n", NAMESPACE, "-o", "wide").stdout)
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(
        incluster.query_pod(samples, "query-orders", "http://order-summary/orders")))  # fmt: skip
    cluster.kubectl("wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Succeeded",
                    "pod/query-orders", "--timeout=120s")  # fmt: skip
    answer = json.loads(cluster.kubectl("logs", "-n", NAMESPACE, "query-orders").stdout)
    step("GET http://order-summary/orders (from a pod)")
    for order, summary in answer["orders"].items():
        print(f"    order {order}: {summary['status']:<22} {', '.join(summary['steps'])}")


def real_node(once: bool, stop: threading.Event) -> int:
    """The demo in a real cluster: every saga call goes operator pod -> participant sidecar
    (TokenReview) -> app container."""
    from accord_operator.envtest.images import build_images

    started = time.monotonic()
    step("building Accord's images from their Dockerfiles (cached by content)")
    images = build_images()
    for image in images.values():
        print(f"    {image.ref}")
    step("starting the control plane and a real node (kubelet, containerd, CNI, DNS)")
    with LocalCluster() as cluster:
        print(f"    node Ready in {cluster.timings['total']:.1f}s, API server {cluster.server}")
        cluster.import_images(images.values())
        refs = {name: image.ref for name, image in images.items()}
        step("helm install accord manifests/chart (controller and webhook as pods)")
        incluster.install_chart(cluster.kubeconfig, refs)
        step(f"the participants as Deployments in {NAMESPACE} (sidecar injected)")
        docs = incluster.injected_namespace(NAMESPACE)
        for role in SHOP:
            docs += [
                {**d, "metadata": {**d["metadata"], "namespace": NAMESPACE}}
                for d in incluster.participant(refs["samples"], role, events_topic="shop.orders")
            ]
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
        )
        cluster.kubectl(
            "wait", "-n", NAMESPACE, "--for=condition=Available", "deployment", "--all",
            "--timeout=180s",
        )  # fmt: skip
        print(
            "    " + cluster.kubectl("get", "pods", "-n", NAMESPACE).stdout.replace("\n", "\n    ")
        )
        step("applying the order sagas")
        for name in ("saga-order.yaml", "saga-order-fails-at-payment.yaml"):
            out = cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / name))
            print("    " + out.stdout.strip())
        wait_settled(cluster, stop)
        print_resources(cluster)
        order_summary(cluster, refs["samples"], stop)
        step("what the participants did (kubectl logs deploy/<role> -c <role>)")
        for role in SHOP:
            logs = cluster.kubectl("logs", "-n", NAMESPACE, f"deploy/{role}", "-c", role).stdout
            for line in logs.splitlines():
                print(f"    {line}")
        print(f"    (all of it in {time.monotonic() - started:.0f}s)")
        if not once:
            print(
                f"The cluster stays up. In another shell:\n"
                f"    export KUBECONFIG={cluster.kubeconfig}\n"
                f"    kubectl get pods -A\n"
                f"    kubectl get accord -n {NAMESPACE}\n"
                f"Press Ctrl-C to stop.",
                flush=True,
            )
            stop.wait()
        step("stopping")
    print("    stopped; nothing left running", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
