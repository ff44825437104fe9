"""The README's demo, end to end (with --once so it stops by itself)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.cluster import REPO, Cluster


def test_demo_shows_every_example_accepted(cluster: Cluster) -> None:
    # `cluster` first, so the binaries exist; the demo starts a control plane of its own.
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "demo.py"), "--once"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in (
        "sagaworkflow.accord.dev/order-1001",
        "sagaworkflow.accord.dev/order-1002",
        "sagaworkflow.accord.dev/trip-77",
        "twophasetransaction.accord.dev/transfer-5001",
        "cqrsprojection.accord.dev/orders-by-customer",
    ):
        assert name in out
    table = out.split("kubectl get accord")[-1]
    assert table.count("Pending") >= 5, table
    assert "stopped; nothing left running" in out
