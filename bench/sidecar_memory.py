"""Benchmark: the sidecar's memory under an hour's worth of invoke traffic (issue 12).

Sends N requests (default 360,000: an hour at 100 req/s) through /v1/invoke to a healthy
target (bench/sink.py), C at a time, and samples the sidecar's RSS as it goes. Prints RSS
after warm-up and at the end, the growth, and the growth per request. A leak of a few
dozen bytes per request (the retry budget's window used to keep one entry per request
and trim only on failure) shows as megabytes here.

    .venv/bin/python bench/sidecar_memory.py [--requests 360000] [--concurrency 32]
        [--sidecar-path DIR]   # another accord_sidecar (e.g. a git worktree's) to compare
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest.controlplane import free_port  # noqa: E402
from tests.support.dataplane import Process, Sidecar, _wait_port  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def drive(
    url: str, n: int, concurrency: int, pid: int, marks: int
) -> list[tuple[int, float]]:
    samples: list[tuple[int, float]] = []
    done = 0
    step = max(1, n // marks)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(count: int) -> None:
            nonlocal done
            for _ in range(count):
                async with session.get(url) as r:
                    await r.read()
                    assert r.status == 200, r.status
                done += 1
                if done % step == 0:
                    samples.append((done, rss_mib(pid)))

        share = n // concurrency
        await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=360_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--sidecar-path", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        target = Process(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(port)],
            tmp / "target.log",
        ).start()
        assert target.proc is not None
        _wait_port(port, target.proc, target.log)
        env = {"ACCORD_SERVICES": f"target=127.0.0.1:{port}", "ACCORD_LOG_LEVEL": "warning"}
        if args.sidecar_path:
            env["PYTHONPATH"] = args.sidecar_path
        sidecar = Sidecar(tmp, "bench", **env).start()
        assert sidecar.proc is not None
        pid = sidecar.proc.pid
        url = f"{sidecar.api}/v1/invoke/target/ping"
        try:
            asyncio.run(drive(url, args.warmup, args.concurrency, pid, 1))
            before = rss_mib(pid)
            started = time.perf_counter()
            samples = asyncio.run(drive(url, args.requests, args.concurrency, pid, 10))
            seconds = time.perf_counter() - started
            after = rss_mib(pid)
        finally:
            sidecar.close()
            target.close()
    total = args.requests // args.concurrency * args.concurrency
    print(f"sidecar: {args.sidecar_path or 'this checkout'}")
    print(f"requests: {total:,} in {seconds:.0f} s ({total / seconds:,.0f} req/s), "
          f"after a {args.warmup:,}-request warm-up")  # fmt: skip
    print("RSS as it went (requests: MiB): "
          + ", ".join(f"{d // 1000}k: {m:.1f}" for d, m in samples))  # fmt: skip
    print(
        f"RSS after warm-up {before:.1f} MiB, at the end {after:.1f} MiB: "
        f"growth {after - before:+.1f} MiB, {(after - before) * 2**20 / total:+.1f} B/request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
