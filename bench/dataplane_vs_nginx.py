"""Benchmark: the sidecar's invoke path side by side with nginx (issue 15), in one run.

Three proxies in front of one target (an nginx answering 200 "ok"), measured in interleaved
rounds, medians printed:
  nginx    Debian's nginx as a reverse proxy (one worker, keep-alive upstream): the floor
  fast     the sidecar on its own HTTP/1.1 (ACCORD_HTTP_ENGINE=fast, the default)
  aiohttp  the sidecar on aiohttp's server and client (ACCORD_HTTP_ENGINE=aiohttp), baseline

- added latency p50/p90/p99 at 200 and 1,000 req/s, open loop (each request timed from when
  it was due, so a stall counts for every request it delays), against the target called
  directly in the same round;
- max throughput (wrk, 32 connections) and requests per CPU-second of the proxy process;
- start to ready (/readyz 200, with the broker up) and RSS idle and after the load, and
  with --soak S after S seconds more of wrk against the fast one (the issue's 5 minutes:
  --soak 300).

Needs nginx and wrk (apt-get install nginx-light wrk) and nats-server.

    .venv/bin/python bench/dataplane_vs_nginx.py [--rounds 3] [--seconds 5] [--soak 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httptools
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest.controlplane import free_port  # noqa: E402
from tests.support.dataplane import NatsServer, Process, Sidecar, _wait_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def nginx(tmp: Path, name: str, server: str) -> tuple[subprocess.Popen[bytes], int]:
    """An nginx with one worker: (its master, the worker's pid)."""
    home = tmp / name
    home.mkdir()
    (home / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  {server}
}}
""")
    master = subprocess.Popen(["nginx", "-c", f"{home}/nginx.conf", "-p", str(home)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master.pid}/task/{master.pid}/children")
        if children.exists() and children.read_text().split():
            return master, int(children.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"nginx {name} did not start: {(home / 'error.log').read_text()}")


# -- open-loop latency ------------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))


async def open_loop(port: int, path: str, rate: float, seconds: float) -> list[float]:
    """GET path at `rate` per second for `seconds`; latencies (s) from when each was due."""
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    latencies: list[float] = []

    async def one(due: float) -> None:
        conn = idle.pop() if idle else None
        while conn is not None and (conn.transport is None or conn.transport.is_closing()):
            conn = idle.pop() if idle else None
        if conn is None:
            _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
        assert conn.transport is not None
        conn.done = loop.create_future()
        conn.transport.write(request)
        await conn.done
        latencies.append(time.perf_counter() - due)  # (the loop's clock counts whole ms)
        idle.append(conn)

    for _ in range(200):  # warm: connections and the proxy's pools
        await one(time.perf_counter())
    latencies.clear()
    start = time.perf_counter() + 0.01
    tasks = []
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        assert conn.transport is not None
        conn.transport.close()
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# -- the run ----------------------------------------------------------------------------------


def wrk(port: int, path: str, seconds: float) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds:g}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"(\d+) requests in", out)
    assert match, out
    return float(match.group(1))


def start_to_ready(tmp: Path, nats_url: str, engine: str) -> float:
    """Seconds from exec to /readyz 200 (the broker up)."""
    sidecar = Sidecar(tmp, f"ready-{engine}-{time.monotonic_ns()}", ACCORD_NATS_URL=nats_url,
                      ACCORD_HTTP_ENGINE=engine)  # fmt: skip
    started = time.perf_counter()
    Process.start(sidecar)  # not Sidecar.start: it waits for the ports itself
    url = f"http://127.0.0.1:{sidecar.admin_port}/readyz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.002)
    took = time.perf_counter() - started
    sidecar.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--soak", type=float, default=0, help="seconds of load, then RSS")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}: apt-get install nginx-light wrk")

    tmp = Path(tempfile.mkdtemp(prefix="accord-bench-"))
    target_port, proxy_port = free_port(), free_port()
    target, _ = nginx(
        tmp,
        "target",
        f"""
  server {{ listen 127.0.0.1:{target_port}; location / {{ return 200 "ok"; }} }}""",
    )
    proxy, proxy_worker = nginx(
        tmp,
        "proxy",
        f"""
  upstream target {{ server 127.0.0.1:{target_port}; keepalive 64;
    keepalive_requests 10000000; }}
  server {{ listen 127.0.0.1:{proxy_port}; location / {{
    proxy_pass http://target; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}""",
    )
    nats = NatsServer(tmp).start()
    _wait_port(nats.port, nats.proc, nats.log)  # type: ignore[arg-type]
    sidecars = {}
    for engine in ("fast", "aiohttp"):
        sidecar = Sidecar(tmp, f"bench-{engine}", ACCORD_HTTP_ENGINE=engine,
                          ACCORD_SERVICES=f"target=127.0.0.1:{target_port}",
                          ACCORD_NATS_URL=nats.url)  # fmt: skip
        sidecars[engine] = sidecar.start()
    proxies = {
        "nginx": (proxy_port, "/ping", proxy_worker),
        **{
            engine: (s.http_port, "/v1/invoke/target/ping", s.proc.pid)  # type: ignore[union-attr]
            for engine, s in sidecars.items()
        },
    }
    try:
        time.sleep(1)
        rss_idle = {e: rss_mib(p[2]) for e, p in proxies.items()}
        added: dict[tuple[str, int], dict[str, list[float]]] = {}
        for rate in (200, 1000):
            for _ in range(args.rounds):
                direct = uvloop.run(open_loop(target_port, "/ping", rate, args.seconds))
                for name, (port, path, _) in proxies.items():
                    via = uvloop.run(open_loop(port, path, rate, args.seconds))
                    row = added.setdefault((name, rate), {"p50": [], "p90": [], "p99": []})
                    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
                        row[key].append(pct(via, q) - pct(direct, q))
        throughput: dict[str, list[float]] = {}
        per_cpu: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, (port, path, pid) in proxies.items():
                cpu = cpu_seconds(pid)
                started = time.perf_counter()
                done = wrk(port, path, args.seconds)
                elapsed = time.perf_counter() - started
                used = cpu_seconds(pid) - cpu
                throughput.setdefault(name, []).append(done / elapsed)
                per_cpu.setdefault(name, []).append(done / used if used else 0)
        rss_loaded = {e: rss_mib(p[2]) for e, p in proxies.items()}
        soaked = {}
        if args.soak:
            for name in ("fast",):  # the engine in use (the baseline's is not the question)
                port, path, pid = proxies[name]
                done = wrk(port, path, args.soak)
                soaked[name] = (rss_mib(pid), done)
        ready = {
            engine: statistics.median(start_to_ready(tmp, nats.url, engine) for _ in range(5))
            for engine in ("fast", "aiohttp")
        }
    finally:
        for s in sidecars.values():
            s.close()
        nats.close()
        for master in (proxy, target):
            master.terminate()
            master.wait()

    print(f"\nmedians of {args.rounds} interleaved rounds, {args.seconds:g} s each\n")
    print(f"{'':34}" + "".join(f"{name:>12}" for name in proxies))
    for rate in (200, 1000):
        for key in ("p50", "p90", "p99"):
            cells = "".join(f"{statistics.median(added[(n, rate)][key]):>+11.3f} " for n in proxies)
            print(f"added {key} at {rate:>5} req/s (ms)   {cells}")
    print("max throughput (req/s)            "
          + "".join(f"{statistics.median(throughput[n]):>12,.0f}" for n in proxies))  # fmt: skip
    print("requests per CPU-second           "
          + "".join(f"{statistics.median(per_cpu[n]):>12,.0f}" for n in proxies))  # fmt: skip
    print("RSS idle (MiB)                    "
          + "".join(f"{rss_idle[n]:>12.1f}" for n in proxies))  # fmt: skip
    print("RSS after the load (MiB)          "
          + "".join(f"{rss_loaded[n]:>12.1f}" for n in proxies))  # fmt: skip
    print("start to ready (ms)               "
          + f"{'-':>12}" + "".join(f"{ready[e] * 1000:>12.0f}" for e in ("fast", "aiohttp")))  # fmt: skip
    for name, (rss, done) in soaked.items():
        print(
            f"{name}: RSS {rss:.1f} MiB after {args.soak:g} s more of load ({done:,.0f} requests)"
        )
    nginx_cpu = statistics.median(per_cpu["nginx"])
    fast_cpu = statistics.median(per_cpu["fast"])
    print(f"\nfast: {fast_cpu / nginx_cpu:.2f} x nginx's requests per CPU-second (goal >= 0.25)")


if __name__ == "__main__":
    main()
