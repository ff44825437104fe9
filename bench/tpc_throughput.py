"""Benchmark: TwoPhaseTransaction throughput with one operator on the real API server.

Three ledger participants (examples/services/ledger.py, SQLite, fsync) behind real sidecars
(the fence, fsync), one operator process. Creates N transactions at a steady rate (open
loop) and prints transactions/s and p50/p99 from create to Committed. In the same run, the
API server's bare status-patch rate (the same JSON patch with a resourceVersion
precondition the coordinator sends, from 16 writers at once), the API requests each
transaction cost (from the API server's own counters), and the CPU each process spent per
transaction: every process shares this machine's cores, so their sum bounds the rate here.
Goal (issue 13): >= 30 tx/s.

    .venv/bin/python bench/tpc_throughput.py [--transactions 300] [--rate 40]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest import ControlPlane  # noqa: E402
from accord_operator.kubeapi import KubeApi  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.tpc import tpc_bed  # noqa: E402

PATH = "/apis/accord.dev/v1alpha1/namespaces/{ns}/twophasetransactions"


def ts(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def pid_of(cp: ControlPlane, binary: str) -> int:
    """The process of one control-plane binary of this control plane."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if Path(argv[0].decode()).name == binary and str(cp.dir).encode() in b" ".join(argv):
            return int(proc.name)
    raise LookupError(f"no {binary} of {cp.dir} running")


def api_requests(cluster: Cluster) -> Counter[tuple[str, str]]:
    """Requests the API server has served so far, by (verb, resource)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (
                labels.get("verb", ""),
                labels.get("resource", "")
                + ("/" + labels["subresource"] if labels.get("subresource") else ""),
            )
            counts[key] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def wait_finished(op: Any, n: int) -> None:
    """Until the operator counts n transactions finished (Committed or Aborted)."""
    while (
        sum(op.metric("accord_transactions_total", outcome=o) for o in ("Committed", "Aborted")) < n
    ):
        time.sleep(0.5)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bare_patch_rate(api: KubeApi, ns: str, writers: int, seconds: float) -> float:
    """Status patches/s with a resourceVersion precondition, `writers` objects at once."""
    body = {
        "apiVersion": "accord.dev/v1alpha1",
        "kind": "TwoPhaseTransaction",
        "spec": {"participants": [{"name": "p", "service": "p"}]},
    }
    objs = [
        await api.request("POST", PATH.format(ns=ns), {**body, "metadata": {"name": f"bare-{i}"}})
        for i in range(writers)
    ]
    count = 0
    stop = time.perf_counter() + seconds

    async def writer(obj: dict[str, Any]) -> None:
        nonlocal count
        rv, n = obj["metadata"]["resourceVersion"], 0
        url = f"{PATH.format(ns=ns)}/{obj['metadata']['name']}/status"
        while time.perf_counter() < stop:
            n += 1
            answer = await api.request(
                "PATCH", url,
                [{"op": "replace", "path": "/metadata/resourceVersion", "value": rv},
                 {"op": "add", "path": "/status", "value": {"phase": "Preparing", "message": str(n)}}],
                content_type="application/json-patch+json",
            )  # fmt: skip
            rv = answer["metadata"]["resourceVersion"]
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(o) for o in objs))
    return count / (time.perf_counter() - started)


async def create_at_rate(
    api: KubeApi, ns: str, items: list[dict[str, Any]], rate: float
) -> dict[str, float]:
    created: dict[str, float] = {}
    start = time.perf_counter()

    async def one(i: int, item: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        created[item["metadata"]["name"]] = time.time()
        await api.request("POST", PATH.format(ns=ns), item)

    await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
    return created


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transactions", type=int, default=300)
    parser.add_argument("--rate", type=float, default=40, help="transactions created per second")
    args = parser.parse_args()
    ns, bare_ns = "bench-tpc", "bench-bare"
    with ControlPlane() as cp, tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cluster = Cluster(cp)
        from accord_operator.envtest.crds import install_crds

        install_crds(cp, ROOT / "crds")
        for n in (ns, bare_ns):
            cluster.kubectl("create", "namespace", n)
        names = ("ledger-a", "ledger-b", "ledger-c")
        with tpc_bed(cluster, ns, tmp, *names, sidecar_env={n: {"ACCORD_LOG_LEVEL": "warning"}
                                                            for n in names}) as bed:  # fmt: skip
            bed.participants["ledger-a"].ledger.deposit("alice", 10**9)
            items = [
                bed.transaction(
                    f"tx-{i}",
                    {
                        "ledger-a": {"account": "alice", "amountCents": -1},
                        "ledger-b": {"account": "bob", "amountCents": 1},
                        "ledger-c": {"account": "fees", "amountCents": 0},
                    },
                )
                for i in range(args.transactions)
            ]
            op = bed.start_operator()

            async def run() -> tuple[float, dict[str, float]]:
                api = KubeApi(str(cluster.kubeconfig))
                try:
                    created = await create_at_rate(api, ns, items, args.rate)
                    # Finished, as the operator's metrics count them: a scrape costs the API
                    # server nothing (a listing of every transaction each second would).
                    await asyncio.to_thread(wait_finished, op, args.transactions)
                    cpu.update(cpu_now())
                    requests.update(await asyncio.to_thread(api_requests, cluster))
                    requests.subtract(before)
                    bare = await bare_patch_rate(api, bare_ns, writers=16, seconds=10)
                    return bare, created
                finally:
                    await api.close()

            before, requests = api_requests(cluster), Counter[tuple[str, str]]()
            cpu: dict[str, float] = {}
            control_plane = {
                name: pid_of(cp, name)
                for name in ("kube-apiserver", "etcd", "kube-controller-manager")
            }

            def cpu_now() -> dict[str, float]:
                return {
                    **{k: cpu_s(pid) for k, pid in control_plane.items()},
                    "operator": cpu_s(op.proc.pid),
                    "sidecars": sum(cpu_s(p.sidecar.proc.pid) for p in bed.participants.values()),
                    "ledgers": sum(cpu_s(p.ledger.proc.pid) for p in bed.participants.values()),
                    "this benchmark": cpu_s(os.getpid()),
                }

            cpu_before = cpu_now()
            bare, created = asyncio.run(run())
            listing = json.loads(cluster.kubectl("get", "tpc", "-n", ns, "-o", "json"))["items"]
            committed = op.metric("accord_phase_transitions_total", kind="TwoPhaseTransaction",
                               phase="Committed")  # fmt: skip
    phases = [t["status"]["phase"] for t in listing]
    finished = {t["metadata"]["name"]: ts(t["status"]["finishedAt"]) for t in listing}
    latency = [finished[n] - created[n] for n in finished]
    wall = max(finished.values()) - min(created.values())
    print(f"transactions: {args.transactions} x 3 participants (ledger + sidecar each), "
          f"created at {args.rate:g}/s, one operator")  # fmt: skip
    print(f"outcomes: {phases.count('Committed')} Committed, {phases.count('Aborted')} Aborted")
    print(f"throughput: {args.transactions / wall:.1f} tx/s over {wall:.1f} s (goal >= 30)")
    print(f"create -> Committed: p50 {pct(latency, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(latency, 0.99) * 1000:.0f} ms")  # fmt: skip
    used = {k: (cpu[k] - cpu_before[k]) * 1000 / args.transactions for k in cpu}
    print("CPU per transaction (create to the last finished): "
          + ", ".join(f"{k} {ms:.1f} ms" for k, ms in used.items())
          + f"; all {sum(used.values()):.0f} ms -> {os.cpu_count()} cores bound this machine to "
          f"{os.cpu_count() * 1000 / sum(used.values()):.0f} tx/s "
          f"({committed:.0f} committed seen by the operator's metrics)")  # fmt: skip
    busy = ", ".join(f"{verb} {res} {n / args.transactions:.2f}"
                     for (verb, res), n in requests.most_common(8) if n > 0)  # fmt: skip
    print(f"API requests per transaction (create to the last finished): {busy}")
    writes = sum(n for (verb, _), n in requests.items() if verb != "GET") / args.transactions
    print(f"API server bare status patches (16 writers, same patch): {bare:.0f}/s; "
          f"at {writes:.1f} writes per transaction (status, finalizer, create, Events) that "
          f"alone allows {bare / writes:.0f} tx/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
