"""The operator process against the real API server: it accepts each kind and reports health."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from accord_operator.envtest.controlplane import free_port
from tests.support.cluster import Cluster, example


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[int]:
    """A real `accord-operator run` process watching this test's namespace."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accord_operator",
            "run",
            "-n",
            namespace,
            "--metrics-port",
            str(port),
        ],
        env={**cluster.env(), "ACCORD_METRICS_HOST": "127.0.0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if os.environ.get("ACCORD_TEST_SHOW_LOGS"):
            print(out.decode(errors="replace"))


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"operator exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''!r}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not up after {timeout}s")


@pytest.mark.parametrize(
    ("file", "kind", "name"),
    [
        ("saga-order.yaml", "saga", "order-1001"),
        ("tpc-transfer.yaml", "tpc", "transfer-5001"),
        ("projection-orders.yaml", "proj", "orders-by-customer"),
    ],
)
def test_operator_accepts_each_kind(
    cluster: Cluster, namespace: str, operator: int, file: str, kind: str, name: str
) -> None:
    cluster.apply(example(file), namespace)
    obj = cluster.wait_for(
        kind, name, namespace, lambda o: (o.get("status") or {}).get("phase") == "Pending"
    )
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Pending"
    assert ready["observedGeneration"] == 1
    if kind in ("saga", "tpc"):
        assert (
            status["progress"]
            == f"0/{len(obj['spec'].get('steps') or obj['spec']['participants'])}"
        )

    events = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "-o",
            "json",
            f"--field-selector=involvedObject.name={name}",
        )
    )["items"]
    assert any(e["reason"] == "Pending" for e in events), events

    with urllib.request.urlopen(f"http://127.0.0.1:{operator}/metrics") as r:
        text = r.read().decode()
    assert "accord_reconciles_total{" in text
    assert 'accord_phase_transitions_total{kind="' in text


def test_operator_tracks_spec_changes_in_observed_generation(
    cluster: Cluster, namespace: str, operator: int
) -> None:
    proj = example("projection-orders.yaml")
    cluster.apply(proj, namespace)
    cluster.wait_for("proj", proj["metadata"]["name"], namespace, lambda o: "status" in o)
    proj["spec"]["replicas"] = 2
    cluster.apply(proj, namespace)
    obj = cluster.wait_for(
        "proj",
        proj["metadata"]["name"],
        namespace,
        lambda o: o.get("status", {}).get("observedGeneration") == 2,
    )
    assert obj["status"]["phase"] == "Pending"
    assert all(c["observedGeneration"] == 2 for c in obj["status"]["conditions"])


def test_healthz_and_metrics(operator: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator}/healthz") as r:
        assert json.load(r)["status"] == "ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{operator}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "accord_operator_build_info" in r.read().decode()
