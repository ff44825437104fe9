"""End to end on a kind cluster: images built from the Dockerfiles, the Helm chart, injected
participants answering a real saga through their sidecars.

Needs a Docker engine (kind runs Kubernetes nodes as containers) and pulls the kind node
image; skipped, saying why, where Docker is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accord_operator.envtest.binaries import find_helm
from tests.support.cluster import REPO


def _docker_works() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"no Docker engine reachable ({lines[-1] if lines else 'docker info failed'})"
    return None


_why = _docker_works()
pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(_why is not None, reason=f"kind needs a Docker engine: {_why}"),
]

CLUSTER = "accord-e2e"
NS = "shop"


def run(*args: str, input: str | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, input=input, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def kind_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    kind = run(str(REPO / "hack" / "build-kind.sh")).strip()
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    run(
        kind,
        "create",
        "cluster",
        "--name",
        CLUSTER,
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        "180s",
    )
    try:
        for image, dockerfile, context in (
            ("accord/operator:e2e", "operator/Dockerfile", "."),
            ("accord/sidecar:e2e", "sidecar_images/sidecar/Dockerfile", "sidecar_images/sidecar"),
        ):
            run(
                "docker",
                "build",
                "-q",
                "-t",
                image,
                "-f",
                str(REPO / dockerfile),
                str(REPO / context),
            )
            run(kind, "load", "docker-image", image, "--name", CLUSTER)
        yield kubeconfig
    finally:
        subprocess.run([kind, "delete", "cluster", "--name", CLUSTER], capture_output=True)


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    return run("kubectl", f"--kubeconfig={kubeconfig}", *args, input=input)


def participant(role: str) -> list[dict[str, Any]]:
    labels = {"app": role}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": role},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": {"accord.dev/app-port": "8080"}},
                    "spec": {
                        "serviceAccountName": "shop",
                        "containers": [
                            {
                                "name": role,
                                "image": "accord/operator:e2e",
                                "imagePullPolicy": "Never",
                                "command": [
                                    "python",
                                    "/app/shop.py",
                                    "--role",
                                    role,
                                    "--port",
                                    "8080",
                                ],
                                "volumeMounts": [{"name": "app", "mountPath": "/app"}],
                                "securityContext": {
                                    "runAsNonRoot": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"},
                                },
                            }
                        ],
                        "volumes": [{"name": "app", "configMap": {"name": "shop"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": role},
            "spec": {"selector": labels, "ports": [{"name": "inbound", "port": 3501}]},
        },
    ]


def test_saga_through_injected_sidecars(kind_cluster: Path) -> None:
    kc = kind_cluster
    run(
        str(find_helm()),
        "install",
        "accord",
        str(REPO / "manifests" / "chart"),
        "--kubeconfig",
        str(kc),
        "-n",
        "accord-system",
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
        "--set",
        "image.repository=accord/operator",
        "--set",
        "image.tag=e2e",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "sidecar.image=accord/sidecar:e2e",
        "--set",
        "nats.url=",
    )
    kubectl(kc, "create", "namespace", NS)
    kubectl(kc, "label", "namespace", NS, "accord.dev/injection=enabled")
    kubectl(kc, "create", "serviceaccount", "shop", "-n", NS)
    # The participants' sidecars check the operator's token with TokenReview.
    kubectl(
        kc,
        "create",
        "clusterrolebinding",
        "shop-auth-delegator",
        "--clusterrole=system:auth-delegator",
        f"--serviceaccount={NS}:shop",
    )
    kubectl(
        kc,
        "create",
        "configmap",
        "shop",
        "-n",
        NS,
        f"--from-file=shop.py={REPO / 'examples' / 'services' / 'shop.py'}",
    )
    docs = [d for role in ("inventory", "payment", "shipping") for d in participant(role)]
    kubectl(
        kc,
        "apply",
        "-n",
        NS,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )
    kubectl(
        kc, "wait", "-n", NS, "--for=condition=Available", "deployment", "--all", "--timeout=300s"
    )
    pod = json.loads(kubectl(kc, "get", "pods", "-n", NS, "-l", "app=payment", "-o", "json"))[
        "items"
    ][0]
    assert pod["spec"]["initContainers"][0]["name"] == "accord-sidecar"  # injected, native

    for example in ("saga-order.yaml", "saga-order-fails-at-payment.yaml"):
        kubectl(kc, "apply", "-n", NS, "-f", str(REPO / "examples" / example))
    deadline = time.monotonic() + 300
    phases: dict[str, str] = {}
    while time.monotonic() < deadline:
        items = json.loads(kubectl(kc, "get", "saga", "-n", NS, "-o", "json"))["items"]
        phases = {s["metadata"]["name"]: (s.get("status") or {}).get("phase", "") for s in items}
        if phases == {"order-1001": "Succeeded", "order-1002": "Compensated"}:
            break
        time.sleep(2)
    assert phases == {"order-1001": "Succeeded", "order-1002": "Compensated"}
