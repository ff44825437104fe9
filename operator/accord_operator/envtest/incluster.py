"""Accord installed in a cluster with a real node, as a user would: the Helm chart with the
images built here, and the sample participants as Deployments whose pods get the sidecar.
Shared by the in-cluster tests and the demo's --real-node mode."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from accord_operator.envtest.binaries import REPO_ROOT, find_helm

CHART = REPO_ROOT / "manifests" / "chart"
RELEASE = "accord"
SYSTEM_NAMESPACE = "accord-system"
PARTICIPANT_SA = "shop"
SHOP_ROLES = ("inventory", "payment", "shipping")
# What PSS `restricted` asks of a container.
RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def split_ref(ref: str) -> tuple[str, str]:
    repository, _, tag = ref.rpartition(":")
    return repository, tag


def helm(kubeconfig: Path, *args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(find_helm()), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def install_chart(kubeconfig: Path, images: dict[str, str], *extra: str) -> None:
    """helm install the chart with our images (present on the node: never pulled)."""
    repository, tag = split_ref(images["operator"])
    helm(
        kubeconfig,
        "install", RELEASE, str(CHART), "-n", SYSTEM_NAMESPACE, "--create-namespace",
        "--wait", "--timeout", "5m",
        "--set", f"image.repository={repository}",
        "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set", f"sidecar.image={images['sidecar']}",
        # The chart's development broker, from our nats image (no registry here).
        "--set", "nats.deploy=true",
        "--set", "nats.url=",
        "--set", f"nats.image={images['nats']}",
        "--set", "nats.pullPolicy=Never",
        *extra,
    )  # fmt: skip


def injected_namespace(name: str, **labels: str) -> list[dict[str, Any]]:
    """A namespace with injection on, and the participants' service account (the chart lets
    its sidecars check callers' tokens with TokenReview)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"accord.dev/injection": "enabled", **labels}},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": PARTICIPANT_SA, "namespace": name},
        },
    ]


def behind_inbound(
    name: str, labels: dict[str, str], template: dict[str, Any]
) -> list[dict[str, Any]]:
    """A Deployment of `template`, and its Service on the sidecar's inbound port (what the
    saga and 2PC wire contracts call)."""
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels}, "template": template},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"name": "inbound", "port": 3501}]},
        },
    ]


def participant(
    samples_image: str, role: str, events_topic: str | None = None, **pod_spec: Any
) -> list[dict[str, Any]]:
    """A sample participant (examples/services/shop.py) as a Deployment, and its Service,
    which points at the sidecar's inbound port as the saga wire contract expects
    (events_topic: it publishes each answered call there, through its sidecar)."""
    labels = {"app": role}
    events = ["--events", events_topic] if events_topic else []
    container = {
        "name": role,
        "image": samples_image,
        "imagePullPolicy": "Never",
        "args": ["shop.py", "--role", role, "--port", "8080", *events],
        "securityContext": RESTRICTED,
    }
    template = {
        "metadata": {"labels": labels, "annotations": {"accord.dev/app-port": "8080"}},
        "spec": {"serviceAccountName": PARTICIPANT_SA, "containers": [container], **pod_spec},
    }
    return behind_inbound(role, labels, template)


def ledger(
    samples_image: str, name: str, seeds: dict[str, int], **annotations: str
) -> list[dict[str, Any]]:
    """A 2PC ledger participant (examples/services/ledger.py, SQLite in an emptyDir that a
    container restart keeps) as a Deployment, and its Service on the sidecar's inbound port."""
    labels = {"app": name}
    container = {
        "name": "ledger",
        "image": samples_image,
        "imagePullPolicy": "Never",
        "args": [
            "ledger.py", "--port", "8080", "--db", "/data/ledger.db", "--name", name,
            *(f"--seed={account}={cents}" for account, cents in seeds.items()),
        ],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": RESTRICTED,
    }  # fmt: skip
    template = {
        "metadata": {
            "labels": labels,
            "annotations": {"accord.dev/app-port": "8080", **annotations},
        },
        "spec": {
            "serviceAccountName": PARTICIPANT_SA,
            "securityContext": {"fsGroup": 65532},
            "containers": [container],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    return behind_inbound(name, labels, template)


def transaction_reader_binding(namespace: str) -> dict[str, Any]:
    """What README "2PC participants" asks of a user whose chart watches every namespace:
    let the namespace's service accounts read its transactions (the chart's ClusterRole)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"{RELEASE}-transaction-reader", "namespace": namespace},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{RELEASE}-transaction-reader",
        },
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": f"system:serviceaccounts:{namespace}",
            }
        ],
    }


def query_pod(samples_image: str, name: str, url: str) -> dict[str, Any]:
    """A pod that GETs `url` once (a query through a Service) and prints the answer."""
    code = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=30).read().decode())"
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"accord.dev/inject": "false"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "query", "image": samples_image, "imagePullPolicy": "Never",
                "args": ["-c", code], "securityContext": RESTRICTED,
            }],
        },
    }  # fmt: skip
