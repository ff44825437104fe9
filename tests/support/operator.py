"""A real accord-operator process for tests, and the webhook wiring the chart would do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accord_operator.certs import CertificateAuthority
from accord_operator.envtest.controlplane import die_with_parent, free_port
from tests.support.cluster import REPO, Cluster


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    webhook_port: int
    ca_pem: bytes
    log: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            text: str = r.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0

    def wait_metric(self, name: str, expected: float, timeout: float = 15, **labels: str) -> None:
        """Wait for one sample to read `expected`. The operator counts what it did once
        the API server has stored it, so a test that saw the stored status may read the
        metrics a moment before the count; it must come, and be exactly that."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} is {value}, not {expected}")
            time.sleep(0.1)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"operator exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def run_operator(
    cluster: Cluster,
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    share_webhook_with: OperatorProcess | None = None,
    log_name: str | None = None,
) -> Iterator[OperatorProcess]:
    """`accord-operator run ARGS` with a certificate made here; stopped with SIGTERM.

    share_webhook_with: another replica's port and certificate (SO_REUSEPORT: the kernel
    spreads connections over the replicas, as a Service spreads them over pods).
    """
    certs = tmp / "webhook-certs"
    metrics_port = free_port()
    if share_webhook_with is None:
        ca = CertificateAuthority("accord-test-webhook-ca")
        certs.mkdir(exist_ok=True)
        ca.issue("accord-webhook", hosts=("127.0.0.1",), server=True).write(certs, "tls")
        webhook_port, ca_pem = free_port(), ca.cert_pem
    else:
        webhook_port, ca_pem = share_webhook_with.webhook_port, share_webhook_with.ca_pem
    log = tmp / (
        log_name or (f"operator-{metrics_port}.log" if share_webhook_with else "operator.log")
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accord_operator",
                "run",
                *args,
                "--metrics-port",
                str(metrics_port),
                "--webhook-port",
                str(webhook_port),
            ],
            env={
                **cluster.env(),
                "ACCORD_METRICS_HOST": "127.0.0.1",
                "ACCORD_WEBHOOK_CERT_DIR": str(certs),
                **(env or {}),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # an interrupted test run leaves no operator behind
        )
    op = OperatorProcess(proc, metrics_port, webhook_port, ca_pem, log)
    try:
        _wait_http(f"http://127.0.0.1:{metrics_port}/healthz", proc, log)
        yield op
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Captured by pytest and shown only when the test fails: what the operator saw.
        text = log.read_text(errors="replace")
        shown = text if os.environ.get("ACCORD_TEST_SHOW_LOGS") else text[-8000:]
        print(f"--- operator log ({log.name}, last {len(shown)} of {len(text)} chars) ---")
        print(shown)


def webhook_configuration(
    name: str, namespace: str, *, port: int, ca_pem: bytes, failure_policy: str = "Fail"
) -> dict[str, Any]:
    """The two webhooks the chart installs, scoped to one test namespace.

    Pods of a namespace labelled accord.dev/injection=enabled go to /inject-sidecar-namespace;
    every other pod goes to /inject-sidecar, which injects only on the pod annotation. Each
    keeps the chart's own matchConditions (which pods the API server sends at all).
    """
    import base64

    conditions = {h["name"]: h["matchConditions"] for h in _chart_webhooks()}

    def hook(hook_name: str, path: str, injection: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": hook_name,
            "clientConfig": {
                "url": f"https://127.0.0.1:{port}/{path}",
                "caBundle": base64.b64encode(ca_pem).decode(),
            },
            "rules": [
                {
                    "operations": ["CREATE"],
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "resources": ["pods"],
                    "scope": "Namespaced",
                }
            ],
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]},
                    injection,
                ]
            },
            "failurePolicy": failure_policy,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "reinvocationPolicy": "Never",
            "matchConditions": conditions[hook_name],
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            hook(
                "namespace.inject.accord.dev",
                "inject-sidecar-namespace",
                {"key": "accord.dev/injection", "operator": "In", "values": ["enabled"]},
            ),
            hook(
                "object.inject.accord.dev",
                "inject-sidecar",
                {"key": "accord.dev/injection", "operator": "NotIn", "values": ["enabled"]},
            ),
        ],
    }


def _chart_webhooks() -> list[dict[str, Any]]:
    import subprocess

    import yaml

    from accord_operator.envtest.binaries import find_helm, pinned_kubernetes_version

    out = subprocess.run(
        [
            str(find_helm()), "template", "accord", str(REPO / "manifests" / "chart"),
            "--show-only", "templates/webhook-config.yaml",
            "--kube-version", pinned_kubernetes_version().lstrip("v"),
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "MutatingWebhookConfiguration"]
    webhooks: list[dict[str, Any]] = docs[0]["webhooks"]
    return webhooks


def create_pod(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> tuple[int, str]:
    """Create a pod, waiting out the first seconds of a namespace without its default SA."""
    deadline = time.monotonic() + 30
    while True:
        result = cluster.cp.kubectl(
            "create", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
        )
        if 'serviceaccount "default" not found' in result.stderr and time.monotonic() < deadline:
            time.sleep(0.3)
            continue
        return result.returncode, result.stderr
