"""Benchmark: latency the sidecar adds to a service call.

At a fixed request rate, alternates a direct GET to a target service with the same GET
through the sidecar (/v1/invoke/target/ping), both measured in the same run, and prints
p50/p99 of each and of the difference. Goal (issue 3): <= 1 ms p50 and <= 3 ms p99 added.

    .venv/bin/python bench/sidecar_invoke.py [--rate 200] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest.controlplane import free_port  # noqa: E402
from tests.support.dataplane import Process, Sidecar, _wait_port  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def load(
    direct: str, via: str, rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    direct_lat: list[float] = []
    via_lat: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str, into: list[float]) -> None:
            started = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                assert r.status == 200, r.status
            into.append(time.perf_counter() - started)

        # Warm-up: connection pools on both paths.
        for _ in range(50):
            await one(direct, [])
            await one(via, [])
        interval = 1.0 / rate
        tasks = []
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < seconds:
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            url, into = (direct, direct_lat) if i % 2 == 0 else (via, via_lat)
            tasks.append(asyncio.create_task(one(url, into)))
            i += 1
        await asyncio.gather(*tasks)
    return direct_lat, via_lat


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rate", type=float, default=200, help="requests per second, both paths together"
    )
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        target = Process(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(port)],
            tmp / "target.log",
        ).start()
        sidecar = Sidecar(
            tmp, "bench", ACCORD_SERVICES=f"target=127.0.0.1:{port}", ACCORD_LOG_LEVEL="warning"
        ).start()
        try:
            assert target.proc is not None
            _wait_port(port, target.proc, target.log)
            direct, via = asyncio.run(
                load(
                    f"http://127.0.0.1:{port}/ping",
                    f"{sidecar.api}/v1/invoke/target/ping",
                    args.rate,
                    args.seconds,
                )
            )
        finally:
            sidecar.close()
            target.close()
    print(
        f"fixed rate {args.rate:.0f} req/s for {args.seconds:.0f}s: {len(direct)} direct, {len(via)} via sidecar"
    )
    print(f"direct:      p50={pct(direct, 0.5):.2f} ms p99={pct(direct, 0.99):.2f} ms")
    print(f"via sidecar: p50={pct(via, 0.5):.2f} ms p99={pct(via, 0.99):.2f} ms")
    print(
        f"added:       p50={pct(via, 0.5) - pct(direct, 0.5):.2f} ms "
        f"p99={pct(via, 0.99) - pct(direct, 0.99):.2f} ms  (goal: <= 1 ms p50, <= 3 ms p99)"
    )
    print(
        f"mean direct {statistics.mean(direct) * 1000:.2f} ms, via {statistics.mean(via) * 1000:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
