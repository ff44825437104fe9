"""Benchmark: what finished sagas cost the operator, and saga throughput, before and after.

One local control plane, two operator builds side by side: "after" (this tree) and "before"
(a git revision, default the last one in which a finished saga kept its daemon and its
finalizer), run from a temporary git worktree.

1. Idle cost: --finished sagas (default 10,000) already Succeeded are stored (their status is
   the real machine's, so they weigh what real ones do). Each build runs alone over them:
   after a warm-up (its start-up listing), its CPU over --idle-seconds and its RSS.
   Goals: < 2% of a core, < 150 MiB.
2. Throughput: --sagas sagas (default 100) of 3 http steps against local sinks, per build,
   --rounds interleaved rounds (default 3), medians: steps/s, and API requests per saga (the
   API server's own request counters for the resources a saga touches, minus the
   benchmark's own requests). Run before the idle phase, which loads the API server.

    .venv/bin/python bench/saga_scale.py [--finished 10000] [--sagas 100] [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest import ControlPlane, local_service  # noqa: E402
from accord_operator.envtest.crds import install_crds  # noqa: E402
from accord_operator.kubeapi import KubeApi  # noqa: E402
from accord_operator.saga.machine import Call, Outcome, SagaMachine  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.operator import run_operator  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from saga_throughput import start_sinks  # noqa: E402

# The last revision in which a finished saga kept a daemon (polling every 2 s) and a
# finalizer; the next one gave terminal sagas no task.
BEFORE = "963b85c"
SAGA_RESOURCES = ("sagaworkflows", "services", "events", "pods")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in ticks of 10 ms


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def finished_status(spec: dict[str, Any]) -> dict[str, Any]:
    """The status the real machine ends with when every step succeeds."""
    machine = SagaMachine(rng=lambda: 0.5)
    obj = {"metadata": {"uid": "u", "generation": 1}, "spec": spec}
    status: dict[str, Any] = {}
    now = time.time() - 3600
    for _ in range(50):
        d = machine.decide(obj, status, now)
        status = d.status
        for call in d.calls:
            assert isinstance(call, Call)
            outcome = Outcome(call.step, call.kind, ok=True, output={"ok": True})
            status = machine.record(obj, status, outcome, now).status
        if machine.finished(status):
            return status
    raise AssertionError("the machine did not finish")


def steps_for(ports: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {
            "name": f"step-{name}",
            "action": {"http": {"service": name, "port": port, "path": "/do"}},
            "compensation": {"http": {"service": name, "port": port, "path": "/undo"}},
        }
        for name, port in ports.items()
    ]


async def store_finished(kubeconfig: str, ns: str, count: int, spec: dict[str, Any]) -> None:
    api = KubeApi(kubeconfig)
    status = finished_status(spec)
    base = f"/apis/accord.dev/v1alpha1/namespaces/{ns}/sagaworkflows"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "apiVersion": "accord.dev/v1alpha1",
                "kind": "SagaWorkflow",
                "metadata": {"name": f"done-{i}"},
                "spec": spec,
            }
            await api.request("POST", base, body)
            await api.request(
                "PATCH", f"{base}/done-{i}/status", {"status": status},
                content_type="application/merge-patch+json",
            )  # fmt: skip

    try:
        await asyncio.gather(*(worker() for _ in range(32)))
    finally:
        await api.close()


def request_count(cluster: Cluster, ns_requests: tuple[str, ...] = SAGA_RESOURCES) -> int:
    """Requests the API server has served for the resources a saga touches."""
    total = 0
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{"):
            m = re.search(r'resource="([^"]*)"', line)
            if m and m.group(1) in ns_requests:
                total += int(float(line.rsplit(" ", 1)[1]))
    return total


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="accord-before-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
            capture_output=True,
        )  # fmt: skip


def idle(cluster: Cluster, tmp: Path, env: dict[str, str], ns: str, seconds: float) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    with run_operator(cluster, tmp, "--controller-only", "-n", ns, env=env) as op:
        assert op.proc is not None
        pid = op.proc.pid
        # Warm-up: the start-up listing (and, before, a finalizer patch per saga) until the
        # CPU over 5 s is under 20% of a core, or three minutes.
        started = time.monotonic()
        while time.monotonic() - started < 180:
            c0 = cpu_seconds(pid)
            time.sleep(5)
            if (cpu_seconds(pid) - c0) / 5 < 0.2:
                break
        warm = time.monotonic() - started
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        rss = rss_mib(pid)
    return f"idle CPU {100 * cpu:5.1f}% of a core, RSS {rss:4.0f} MiB (warm-up {warm:.0f}s)"


def throughput(
    cluster: Cluster, tmp: Path, env: dict[str, str], ns: str, n: int, ports: dict[str, int]
) -> tuple[float, float, str]:
    cluster.kubectl("create", "namespace", ns)
    for name in ports:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(local_service(name)))
    steps = steps_for(ports)
    items = [
        {
            "apiVersion": "accord.dev/v1alpha1",
            "kind": "SagaWorkflow",
            "metadata": {"name": f"tp-{i}"},
            "spec": {"steps": steps},
        }
        for i in range(n)
    ]
    own = 0
    tmp.mkdir(parents=True, exist_ok=True)
    with run_operator(cluster, tmp, "--controller-only", "-n", ns, env=env):
        before = request_count(cluster)
        started = time.time()
        cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps({"kind": "List",
                        "apiVersion": "v1", "items": items}))  # fmt: skip
        own += n
        while True:
            sagas = json.loads(cluster.kubectl("get", "saga", "-n", ns, "-o", "json"))["items"]
            own += 1
            if len(sagas) == n and all(
                (s.get("status") or {}).get("phase") in ("Succeeded", "Compensated", "Failed")
                for s in sagas
            ):
                break
            time.sleep(2)
        wall = time.time() - started
        requests = request_count(cluster) - before - own
    ok = sum(s["status"]["phase"] == "Succeeded" for s in sagas)
    rate = n * len(steps) / wall
    return rate, requests / n, f"{rate:.1f} steps/s, {ok}/{n} Succeeded"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--sagas", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per build")
    parser.add_argument("--before", default=BEFORE, help=f"git revision (default {BEFORE})")
    args = parser.parse_args()
    with (
        ControlPlane() as cp,
        tempfile.TemporaryDirectory() as tmp_dir,
        worktree(args.before) as old,
    ):
        tmp = Path(tmp_dir)
        cluster = Cluster(cp)
        install_crds(cp, ROOT / "crds")
        # "after" runs first: it writes nothing to a finished saga, so "before" then starts
        # from the same untouched objects (the other way round, "after" would first have to
        # undo the finalizers "before" added).
        builds = {
            "after": {"PYTHONPATH": str(ROOT / "operator")},
            "before": {"PYTHONPATH": str(old / "operator")},
        }
        started = start_sinks(tmp)
        sinks = [sink for _, sink in started.values()]
        ports = {name: port for name, (port, _) in started.items()}
        try:
            cluster.kubectl("create", "namespace", "finished")
            t0 = time.monotonic()
            spec = {"steps": steps_for(ports)}
            asyncio.run(store_finished(str(cp.kubeconfig), "finished", args.finished, spec))
            print(f"stored {args.finished} finished sagas in {time.monotonic() - t0:.0f}s")
            # Throughput first, rounds interleaved (the idle phase of "before" leaves the API
            # server busy for a while: 10,000 finalizer patches).
            rounds: dict[str, list[tuple[float, float, str]]] = {b: [] for b in builds}
            for r in range(args.rounds):
                for build, env in builds.items():
                    rounds[build].append(
                        throughput(cluster, tmp / f"tp-{build}-{r}", env, f"tp-{build}-{r}",
                                   args.sagas, ports)
                    )  # fmt: skip
            idles: dict[str, str] = {}
            for build, env in builds.items():
                idles[build] = idle(cluster, tmp / f"idle-{build}", env, "finished",
                                    args.idle_seconds)  # fmt: skip
        finally:
            for sink in sinks:
                sink.close()
    print(f"\n{args.finished} finished sagas stored; operator watching their namespace:")
    for build in builds:
        label = args.before if build == "before" else "this tree"
        print(f"  {build:6} ({label}): {idles[build]}")
    print(f"\nthroughput, {args.sagas} sagas x 3 http steps, {args.rounds} interleaved rounds:")
    for build in builds:
        steps_s = statistics.median(r[0] for r in rounds[build])
        per_saga = statistics.median(r[1] for r in rounds[build])
        print(f"  {build:6}: median {steps_s:6.1f} steps/s, {per_saga:5.1f} API requests per saga"
              f"  (rounds: {'; '.join(r[2] for r in rounds[build])})")  # fmt: skip
    print("\ngoals: idle < 2% of a core and < 150 MiB with 10,000 finished sagas")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
