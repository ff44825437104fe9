"""The operator process against the real API server: it accepts each kind and reports health."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, example
from tests.support.operator import OperatorProcess, run_operator


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """A real `accord-operator run` process watching this test's namespace."""
    with run_operator(cluster, tmp_path, "-n", namespace) as op:
        yield op


@pytest.mark.parametrize(
    ("file", "kind", "name"),
    [
        ("projection-orders.yaml", "proj", "orders-by-customer"),
    ],
)
def test_operator_accepts_each_kind(
    cluster: Cluster, namespace: str, operator: OperatorProcess, file: str, kind: str, name: str
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

    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as r:
        text = r.read().decode()
    assert "accord_reconciles_total{" in text
    assert 'accord_phase_transitions_total{kind="' in text


def test_a_transaction_whose_participants_do_not_exist_aborts_and_finishes(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """The example's Services are not in this namespace: no prepare can reach them, the
    prepare timeout aborts it, and an abort needs sending to nobody (none holds anything)."""
    cluster.apply(example("tpc-transfer.yaml"), namespace)
    obj = cluster.wait_for(
        "tpc", "transfer-5001", namespace,
        lambda o: (o.get("status") or {}).get("phase") == "Aborted", timeout=60,
    )  # fmt: skip
    status = obj["status"]
    assert status["decision"] == "Abort" and "prepare timeout" in status["reason"]
    assert status["progress"] == "2/2" and status["observedGeneration"] == 1
    assert [p.get("reached", False) for p in status["participants"]] == [False, False]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Aborted"
    operator.wait_metric("accord_transactions_total", 1, outcome="Aborted")


def test_operator_tracks_spec_changes_in_observed_generation(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    proj = example("projection-orders.yaml")
    cluster.apply(proj, namespace)
    cluster.wait_for("proj", proj["metadata"]["name"], namespace, lambda o: "status" in o)
    proj["spec"]["source"]["maxDeliveries"] = 7
    cluster.apply(proj, namespace)
    obj = cluster.wait_for(
        "proj",
        proj["metadata"]["name"],
        namespace,
        lambda o: o.get("status", {}).get("observedGeneration") == 2,
    )
    assert obj["status"]["phase"] == "Pending"
    assert all(c["observedGeneration"] == 2 for c in obj["status"]["conditions"])


def test_a_projection_whose_acceptance_was_lost_is_accepted_all_the_same(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """kopf writes its bookkeeping and the status in two patches. An operator killed between
    them (or a status patch that failed) leaves a projection kopf takes as handled, with no
    status: the next operator still accepts it, and carries on from there."""
    proj = example("projection-orders.yaml")
    handled = json.dumps({"spec": proj["spec"], "metadata": {"labels": {}}})
    proj["metadata"]["annotations"] = {
        "accord.dev/kopf-managed": "yes",
        "accord.dev/last-handled-configuration": handled,
    }
    cluster.apply(proj, namespace)
    name = proj["metadata"]["name"]
    with run_operator(cluster, tmp_path, "-n", namespace):
        obj = cluster.wait_for(
            "proj", name, namespace, lambda o: (o.get("status") or {}).get("phase") == "Pending"
        )
        assert obj["status"]["observedGeneration"] == 1
        proj["spec"]["source"]["maxDeliveries"] = 7
        cluster.apply(proj, namespace)
        cluster.wait_for(
            "proj", name, namespace,
            lambda o: (o.get("status") or {}).get("observedGeneration") == 2,
        )  # fmt: skip


def test_healthz_and_metrics(operator: OperatorProcess) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/healthz") as r:
        assert json.load(r)["status"] == "ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "accord_operator_build_info" in r.read().decode()
