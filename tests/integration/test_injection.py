"""Sidecar injection through the real kube-apiserver, which calls the operator over TLS."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accord_operator.envtest.controlplane import free_port
from accord_operator.injector.config import SIDECAR_NAME, STATUS
from tests.support.cluster import Cluster
from tests.support.operator import OperatorProcess, create_pod, run_operator, webhook_configuration


@pytest.fixture(scope="module")
def webhook(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One webhook-only operator for the module (its replicas need no namespace)."""
    with run_operator(cluster, tmp_path_factory.mktemp("webhook"), "--webhook-only") as op:
        yield op


@pytest.fixture
def wire(cluster: Cluster, namespace: str) -> Iterator[Any]:
    """Install a MutatingWebhookConfiguration scoped to this test's namespace."""
    names: list[str] = []

    def install(port: int, ca_pem: bytes, failure_policy: str = "Fail") -> None:
        name = f"accord-{namespace}"
        config = webhook_configuration(
            name, namespace, port=port, ca_pem=ca_pem, failure_policy=failure_policy
        )
        cluster.kubectl("apply", "-f", "-", input=json.dumps(config))
        names.append(name)

    yield install
    for name in names:
        cluster.kubectl(
            "delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False
        )


def _pod(name: str, annotations: dict[str, str] | None = None, **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1", **container}]},
    }


def _label(cluster: Cluster, namespace: str, *labels: str) -> None:
    cluster.kubectl("label", "namespace", namespace, "--overwrite", *labels)


def _sidecar(pod: dict[str, Any]) -> dict[str, Any] | None:
    spec = pod["spec"]
    return next(
        (
            c
            for c in [*spec.get("initContainers", []), *spec["containers"]]
            if c["name"] == SIDECAR_NAME
        ),
        None,
    )


def test_pod_in_an_enabled_namespace_is_stored_with_the_sidecar(
    cluster: Cluster, namespace: str, webhook: OperatorProcess, wire: Any
) -> None:
    _label(cluster, namespace, "accord.dev/injection=enabled")
    wire(webhook.webhook_port, webhook.ca_pem)
    code, err = create_pod(cluster, namespace, _pod("orders", {"accord.dev/app-port": "8080"}))
    assert code == 0, err
    pod = cluster.get("pod", "orders", namespace)
    sidecar = pod["spec"]["initContainers"][0]  # v1.36: a native sidecar
    assert sidecar["name"] == SIDECAR_NAME and sidecar["restartPolicy"] == "Always"
    assert {"name": "ACCORD_APP_PORT", "value": "8080"} in sidecar["env"]
    assert json.loads(pod["metadata"]["annotations"][STATUS])["native"] is True
    assert {"name": "ACCORD_HTTP_PORT", "value": "3500"} in pod["spec"]["containers"][0]["env"]
    assert webhook.metric("accord_injections_total", result="injected") >= 1


def test_opt_in_and_opt_out_by_annotation(
    cluster: Cluster, namespace: str, webhook: OperatorProcess, wire: Any
) -> None:
    wire(webhook.webhook_port, webhook.ca_pem)
    assert create_pod(cluster, namespace, _pod("plain"))[0] == 0
    assert create_pod(cluster, namespace, _pod("asked", {"accord.dev/inject": "true"}))[0] == 0
    assert _sidecar(cluster.get("pod", "plain", namespace)) is None
    assert _sidecar(cluster.get("pod", "asked", namespace)) is not None

    _label(cluster, namespace, "accord.dev/injection=enabled")
    assert create_pod(cluster, namespace, _pod("declined", {"accord.dev/inject": "false"}))[0] == 0
    declined = cluster.get("pod", "declined", namespace)
    assert _sidecar(declined) is None and STATUS not in declined["metadata"]["annotations"]


def test_bad_annotation_is_refused_naming_it(
    cluster: Cluster, namespace: str, webhook: OperatorProcess, wire: Any
) -> None:
    wire(webhook.webhook_port, webhook.ca_pem)
    code, err = create_pod(
        cluster,
        namespace,
        _pod("bad", {"accord.dev/inject": "true", "accord.dev/app-port": "http"}),
    )
    assert code != 0
    assert "accord.dev/app-port: 'http' is not an integer" in err
    assert not cluster.exists("pod", "bad", namespace)
    # The same annotation on a pod that did not ask for the sidecar is none of our business.
    assert create_pod(cluster, namespace, _pod("other", {"accord.dev/app-port": "http"}))[0] == 0


def test_compliant_pod_is_admitted_under_restricted_pod_security(
    cluster: Cluster, namespace: str, webhook: OperatorProcess, wire: Any
) -> None:
    _label(
        cluster,
        namespace,
        "accord.dev/injection=enabled",
        "pod-security.kubernetes.io/enforce=restricted",
    )
    wire(webhook.webhook_port, webhook.ca_pem)
    restricted = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    code, err = create_pod(cluster, namespace, _pod("secure", securityContext=restricted))
    assert code == 0, err
    assert _sidecar(cluster.get("pod", "secure", namespace)) is not None
    # The namespace really enforces: a non-compliant pod is refused.
    code, err = create_pod(cluster, namespace, _pod("loose"))
    assert code != 0 and "violates PodSecurity" in err


def test_deployment_pods_are_injected(
    cluster: Cluster, namespace: str, webhook: OperatorProcess, wire: Any
) -> None:
    _label(cluster, namespace, "accord.dev/injection=enabled")
    wire(webhook.webhook_port, webhook.ca_pem)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.local/web:1"}]},
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    deadline = time.monotonic() + 60
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(pods) < 2:
        pods = json.loads(
            cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json")
        )["items"]
        time.sleep(0.5)
    assert len(pods) == 2
    assert all(_sidecar(p) is not None for p in pods)


def test_webhook_down_with_fail_refuses_with_a_clear_message(
    cluster: Cluster, namespace: str, wire: Any
) -> None:
    _label(cluster, namespace, "accord.dev/injection=enabled")
    wire(free_port(), b"not used: nothing listens", failure_policy="Fail")
    code, err = create_pod(cluster, namespace, _pod("blocked"))
    assert code != 0
    assert 'failed calling webhook "namespace.inject.accord.dev"' in err
    assert not cluster.exists("pod", "blocked", namespace)


def test_webhook_down_with_ignore_admits_and_the_miss_is_reported(
    cluster: Cluster, namespace: str, wire: Any, tmp_path: Path
) -> None:
    wire(free_port(), b"not used: nothing listens", failure_policy="Ignore")
    assert create_pod(cluster, namespace, _pod("missed", {"accord.dev/inject": "true"}))[0] == 0
    assert create_pod(cluster, namespace, _pod("unasked"))[0] == 0
    assert _sidecar(cluster.get("pod", "missed", namespace)) is None

    with run_operator(cluster, tmp_path, "--controller-only", "-n", namespace) as op:
        deadline = time.monotonic() + 60
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not events:
            events = [
                e
                for e in json.loads(
                    cluster.kubectl("get", "events", "-n", namespace, "-o", "json")
                )["items"]
                if e["reason"] == "SidecarMissing"
            ]
            time.sleep(0.3)
        assert [e["involvedObject"]["name"] for e in events] == ["missed"]
        assert events[0]["type"] == "Warning"
        assert "Recreate the pod" in events[0]["message"]
        op.wait_metric("accord_injection_misses_total", 1, namespace=namespace)

    # A restarted operator does not report the same pod twice.
    with run_operator(cluster, tmp_path, "--controller-only", "-n", namespace) as op:
        time.sleep(3)
        assert op.metric("accord_injection_misses_total", namespace=namespace) == 0
    events = [
        e
        for e in json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))[
            "items"
        ]
        if e["reason"] == "SidecarMissing"
    ]
    assert len(events) == 1
