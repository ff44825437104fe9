"""Benchmark: SagaWorkflow throughput with one operator process on the real API server.

Creates N sagas (default 200) of 3 http steps against fast local participants (ExternalName
Services to bench/sink.py), and prints sagas/s, steps/s, p50/p99 saga duration (creation
to finish) and the operator's peak RSS. Goal (issue 5): >= 30 steps/s.

    .venv/bin/python bench/saga_throughput.py [--sagas 200]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest import ControlPlane, local_service  # noqa: E402
from accord_operator.envtest.controlplane import free_port  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.dataplane import Process, _wait_port  # noqa: E402
from tests.support.operator import run_operator  # noqa: E402


def ts(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_sinks(tmp: Path) -> dict[str, tuple[int, Process]]:
    """Three fast local participants (bench/sink.py): name -> (port, process)."""
    sinks = {}
    for name in ("inventory", "payment", "shipping"):
        port = free_port()
        sink = Process(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(port)],
            tmp / f"{name}.log",
        ).start()
        assert sink.proc is not None
        _wait_port(port, sink.proc, sink.log)
        sinks[name] = (port, sink)
    return sinks


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sagas", type=int, default=200)
    args = parser.parse_args()
    ns = "bench-saga"
    with ControlPlane() as cp, tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cluster = Cluster(cp)
        from accord_operator.envtest.crds import install_crds

        install_crds(cp, ROOT / "crds")
        cluster.kubectl("create", "namespace", ns)
        sinks = [(name, port, sink) for name, (port, sink) in start_sinks(tmp).items()]
        for name, _, _ in sinks:
            cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(local_service(name)))
        steps = [
            {
                "name": f"step-{name}",
                "action": {"http": {"service": name, "port": port, "path": "/do"}},
                "compensation": {"http": {"service": name, "port": port, "path": "/undo"}},
            }
            for name, port, _ in sinks
        ]
        items = [
            {
                "apiVersion": "accord.dev/v1alpha1",
                "kind": "SagaWorkflow",
                "metadata": {"name": f"bench-{i}"},
                "spec": {"steps": steps},
            }
            for i in range(args.sagas)
        ]
        try:
            with run_operator(cluster, tmp, "--controller-only", "-n", ns) as op:
                started = time.time()
                cluster.kubectl(
                    "apply",
                    "-n",
                    ns,
                    "-f",
                    "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                )
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    sagas = json.loads(cluster.kubectl("get", "saga", "-n", ns, "-o", "json"))[
                        "items"
                    ]
                    if len(sagas) == args.sagas and all(
                        (s.get("status") or {}).get("phase")
                        in ("Succeeded", "Compensated", "Failed")
                        for s in sagas
                    ):
                        break
                    time.sleep(2)  # polling 200 sagas loads the API server we measure
                assert op.proc is not None
                rss = peak_rss_mib(op.proc.pid)
        finally:
            for _, _, sink in sinks:
                sink.close()
    phases = [s["status"]["phase"] for s in sagas]
    finished = [ts(s["status"]["finishedAt"]) for s in sagas]
    durations = sorted(
        ts(s["status"]["finishedAt"]) - ts(s["metadata"]["creationTimestamp"]) for s in sagas
    )
    wall = max(finished) - started
    n_steps = args.sagas * len(steps)
    print(f"sagas: {args.sagas} x {len(steps)} http steps, one operator process")
    print(
        f"outcomes: {phases.count('Succeeded')} Succeeded, {len(phases) - phases.count('Succeeded')} other"
    )
    print(
        f"wall time {wall:.1f}s: {args.sagas / wall:.1f} sagas/s, {n_steps / wall:.1f} steps/s (goal >= 30 steps/s)"
    )
    print(
        f"saga duration (created -> finished): p50={durations[len(durations) // 2]:.2f}s "
        f"p99={durations[min(len(durations) - 1, int(0.99 * len(durations)))]:.2f}s"
    )
    print(f"operator peak RSS: {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
