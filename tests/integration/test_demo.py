"""The README's demo, end to end (with --once so it stops by itself)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support.cluster import REPO, Cluster


def test_demo_shows_sagas_and_transfers_that_succeed_and_fail(cluster: Cluster) -> None:
    # `cluster` first, so the binaries exist; the demo starts a control plane of its own.
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "demo.py"), "--once"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"sagaworkflow.accord.dev/order-1001\s+Succeeded\s+3/3", out)
    assert re.search(r"sagaworkflow.accord.dev/order-1002\s+Compensated", out)
    assert re.search(
        r"twophasetransaction.accord.dev/transfer-5001\s+Committed\s+Commit\s+2/2", out
    )
    assert re.search(r"twophasetransaction.accord.dev/transfer-5002\s+Aborted\s+Abort\s+2/2", out)
    assert "ledger-a: commit accord-demo/transfer-5001 -> balances: alice 50.00" in out
    assert "ledger-b: commit accord-demo/transfer-5001 -> balances: bob 50.00" in out
    assert "ledger-a: prepare accord-demo/transfer-5002 -> vote abort" in out
    assert re.search(r"cqrsprojection.accord.dev/orders-by-customer\s+Pending", out)
    assert "Compensating" in out and "card declined for order 1002" in out
    assert "inventory: /release -> 200" in out
    assert "stopped; nothing left running" in out
