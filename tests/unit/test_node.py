"""The real node's pure parts: what it says when this machine cannot run it, and the
configuration it gives its components."""

from __future__ import annotations

from pathlib import Path

import pytest

from accord_operator.envtest import node
from accord_operator.envtest.node import (
    CLUSTER_DNS,
    LocalCluster,
    NodeBinaries,
    NodeUnavailable,
    preflight,
)


def fake_binaries(tmp_path: Path, runc: Path) -> NodeBinaries:
    paths = [tmp_path / n for n in ("kubelet", "kube-proxy", "kube-scheduler", "containerd",
                                    "ctr", "shim", "coredns", "pause")]  # fmt: skip
    return NodeBinaries(*paths, cni_dir=tmp_path / "cni", runc=runc)


def test_without_root_it_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(node.os, "geteuid", lambda: 1000)
    problems = preflight(fake_binaries(tmp_path, tmp_path / "runc"))
    assert "root (namespaces, mounts, cgroups)" in problems
    assert "runc (apt-get install runc)" in problems


def test_start_names_everything_missing_in_one_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(node.os, "geteuid", lambda: 1000)
    cluster = LocalCluster.__new__(LocalCluster)
    cluster.node_binaries = fake_binaries(tmp_path, tmp_path / "runc")
    with pytest.raises(NodeUnavailable) as raised:
        cluster.start()
    assert str(raised.value).startswith("cannot run a real node here; missing: root")
    assert "runc" in str(raised.value)


def test_dns_service_and_kubelet_agree() -> None:
    dns = node._kube_dns("10.223.0.2")
    service, endpoints = dns["items"]
    assert service["spec"]["clusterIP"] == CLUSTER_DNS
    assert endpoints["endpoints"][0]["addresses"] == ["10.223.0.2"]
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
