"""Benchmark: server-side admission latency of the injection webhook.

Creates N pods (default 100) concurrently through the real kube-apiserver into a namespace
with accord.dev/injection=enabled, then prints p50/p99 of:
  - the webhook's own time per review (accord_admission_duration_seconds, fine buckets);
  - the API server's view of the webhook call, TLS and network included
    (apiserver_admission_webhook_admission_duration_seconds, coarse upstream buckets);
  - the client's pod CREATE round trip, for context.
Goal (issue 4): webhook p99 < 10 ms.

    .venv/bin/python bench/admission_latency.py [--pods 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest import ControlPlane  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.operator import run_operator, webhook_configuration  # noqa: E402


def histogram(text: str, name: str, match: str = "") -> list[tuple[float, float]]:
    """Cumulative (le, count) pairs of one histogram, summed over series containing match."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{") and match in line:
            le = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = buckets.get(
                float("inf") if le == "+Inf" else float(le), 0.0
            ) + float(line.rsplit(" ", 1)[1])
    return sorted(buckets.items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return buckets[-1][0]


def delta(
    after: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    b = dict(before)
    return [(le, c - b.get(le, 0.0)) for le, c in after]


async def create_pods(cp: ControlPlane, namespace: str, start: int, n: int) -> list[float]:
    assert cp.dir is not None
    pki = cp.dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    url = f"{cp.server}/api/v1/namespaces/{namespace}/pods"
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"bench-{i}"},
            "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
        }
        started = time.perf_counter()
        async with session.post(url, json=pod) as r:
            body = await r.json()
            if r.status != 201:
                raise RuntimeError(f"pod create failed: {r.status} {body}")
            containers = body["spec"].get("initContainers", []) + body["spec"]["containers"]
            assert any(c["name"] == "accord-sidecar" for c in containers), "not injected"
        latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(ssl=ctx, limit=n)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, start + i) for i in range(n)))
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="webhook-only operator processes sharing the port (SO_REUSEPORT)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="create the pods one after another instead (for comparison)",
    )
    args = parser.parse_args()
    with ControlPlane() as cp, tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(cp)
        ns = "bench-admission"
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "accord.dev/injection=enabled")
        # The namespace's default ServiceAccount comes from the controller manager.
        cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", ns, "--timeout=60s")
        with contextlib.ExitStack() as stack:
            op = stack.enter_context(run_operator(cluster, Path(tmp), "--webhook-only"))
            replicas = [op] + [
                stack.enter_context(
                    run_operator(cluster, Path(tmp), "--webhook-only", share_webhook_with=op)
                )
                for _ in range(args.replicas - 1)
            ]

            def ours_text() -> str:
                return "\n".join(r.metrics() for r in replicas)

            config = webhook_configuration(
                "accord-bench", ns, port=op.webhook_port, ca_pem=op.ca_pem
            )
            cluster.kubectl("apply", "-f", "-", input=json.dumps(config))
            api_metric = "apiserver_admission_webhook_admission_duration_seconds"
            reports = []
            # Round 1 opens the API server's connection pool to the webhook (TLS handshakes);
            # round 2 is the steady state of a cluster that has been creating pods.
            for round_no in (1, 2):
                ours_before = histogram(ours_text(), "accord_admission_duration_seconds")
                api_before = histogram(
                    cluster.kubectl("get", "--raw", "/metrics"), api_metric, "accord.dev"
                )
                started = time.perf_counter()
                if args.sequential:
                    client: list[float] = []
                    for i in range(args.pods):
                        client += asyncio.run(create_pods(cp, ns, round_no * 10_000 + i, 1))
                else:
                    client = asyncio.run(create_pods(cp, ns, round_no * 10_000, args.pods))
                wall = time.perf_counter() - started
                ours = delta(
                    histogram(ours_text(), "accord_admission_duration_seconds"), ours_before
                )
                api = delta(
                    histogram(
                        cluster.kubectl("get", "--raw", "/metrics"), api_metric, "accord.dev"
                    ),
                    api_before,
                )
                reports.append((round_no, wall, client, ours, api))

    for round_no, wall, client, ours, api in reports:
        report(args, round_no, wall, client, ours, api)
    return 0


def report(
    args: argparse.Namespace,
    round_no: int,
    wall: float,
    client: list[float],
    ours: list[tuple[float, float]],
    api: list[tuple[float, float]],
) -> None:
    client.sort()
    how = "one after another" if args.sequential else "concurrently"
    how += f", {args.replicas} webhook replica(s)"
    label = "cold connection pool" if round_no == 1 else "warm connection pool"
    print(
        f"round {round_no} ({label}): pods created {how}: {args.pods} "
        f"in {wall:.2f}s ({args.pods / wall:.0f} pods/s)"
    )
    print(
        f"webhook (accord_admission_duration_seconds): reviews={ours[-1][1]:.0f} "
        f"p50={quantile(0.5, ours) * 1000:.2f} ms p99={quantile(0.99, ours) * 1000:.2f} ms"
    )
    if api and api[-1][1]:
        under_5 = next((c for le, c in api if le == 0.005), 0.0) / api[-1][1]
        print(
            f"API server's webhook call (coarse buckets 5/25/100 ms): calls={api[-1][1]:.0f} "
            f"p50={quantile(0.5, api) * 1000:.1f} ms p99={quantile(0.99, api) * 1000:.1f} ms "
            f"(<=5 ms: {under_5:.0%})"
        )
    print(
        f"client pod CREATE round trip: p50={statistics.median(client) * 1000:.1f} ms "
        f"p99={client[int(0.99 * (len(client) - 1))] * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
