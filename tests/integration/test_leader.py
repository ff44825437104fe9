"""One active controller among replicas (a Lease): a standby is alive but not ready and
does nothing; it takes over when the leader dies (the lease expires) or stops (released)."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from accord_operator.leader import LEASE_NAME, LEASE_S
from tests.support.cluster import Cluster
from tests.support.operator import OperatorProcess, run_operator


def ready(op: OperatorProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/readyz", timeout=2):
            return True
    except urllib.error.HTTPError:
        return False


def holder(cluster: Cluster, namespace: str) -> str:
    lease = json.loads(cluster.kubectl("get", "lease", LEASE_NAME, "-n", namespace, "-o", "json"))
    return str(lease["spec"].get("holderIdentity") or "")


def wait(what: str, probe: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s")


def running(cluster: Cluster, namespace: str, name: str) -> bool:
    return cluster.get("saga", name, namespace).get("status", {}).get("phase") == "Running"


def saga(name: str) -> dict[str, object]:
    # Its participant does not exist: the leader retries it, which is all we need to see.
    step = {"name": "call", "action": {"http": {"service": "nobody", "path": "/x"}},
            "retry": {"maxAttempts": 50}}  # fmt: skip
    return {"apiVersion": "accord.dev/v1alpha1", "kind": "SagaWorkflow",
            "metadata": {"name": name}, "spec": {"steps": [step]}}  # fmt: skip


def test_one_leads_a_standby_waits_and_takes_over(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    env = {"ACCORD_LEADER_ELECTION": "true", "ACCORD_OPERATOR_NAMESPACE": namespace}
    args = ("--controller-only", "-n", namespace)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with run_operator(cluster, tmp_path / "a", *args, env={**env, "POD_NAME": "ctl-a"}) as a:
        wait("a leads", lambda: ready(a), 30)
        with run_operator(cluster, tmp_path / "b", *args, env={**env, "POD_NAME": "ctl-b"}) as b:
            time.sleep(3)
            assert not ready(b) and holder(cluster, namespace) == "ctl-a"
            cluster.apply(saga("first"), namespace)
            wait("the leader drives the saga", lambda: running(cluster, namespace, "first"), 30)
            assert "first" not in b.log.read_text()  # the standby did nothing

            a.proc.send_signal(signal.SIGKILL)  # no release: the lease must expire first
            a.proc.wait()
            wait("b takes over", lambda: ready(b), LEASE_S + 15)
            assert holder(cluster, namespace) == "ctl-b"
            cluster.apply(saga("second"), namespace)
            wait("the new leader drives sagas", lambda: running(cluster, namespace, "second"), 30)
        # b stopped cleanly: it released the lease, so the next leader need not wait.
        assert holder(cluster, namespace) == ""
