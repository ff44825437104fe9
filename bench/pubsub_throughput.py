"""Benchmark: publish-to-delivery throughput through one sidecar pair.

A publisher sidecar takes N events on POST /v1/publish/<topic> (C concurrent requests);
a subscriber sidecar delivers them to an app (bench/sink.py). Prints events/s from the
first publish to the last delivery, and the publish rate alone. Goal (issue 3): >= 5,000/s.

    .venv/bin/python bench/pubsub_throughput.py [--events 20000] [--publishers 64] [--concurrency 64]
        [--preload]   # publish them all first, then time the subscriber's delivery alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accord_operator.envtest.controlplane import free_port  # noqa: E402
from accord_sidecar.fasthttp import Upstream  # noqa: E402
from tests.support.dataplane import NatsServer, Process, Sidecar, _wait_port  # noqa: E402


def count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_count") as r:
        unique: int = json.load(r)["unique"]
        return unique


async def publish(port: int, n: int, publishers: int, batch: int) -> float:
    """Publish n events through the sidecar on `port`, `publishers` requests at a time, with
    the sidecar's own keep-alive client (light enough not to be what is measured)."""
    upstream = Upstream("127.0.0.1", port)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(0, n, batch):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            if batch == 1:
                body, kind = json.dumps({"order": i}).encode(), "application/json"
            else:
                events = [
                    {
                        "specversion": "1.0",
                        "id": str(uuid.uuid4()),
                        "source": "/bench",
                        "type": "bench",
                        "data": {"order": j},
                    }
                    for j in range(i, min(n, i + batch))
                ]
                body, kind = json.dumps(events).encode(), "application/cloudevents-batch+json"
            status, _, answer = await upstream.request(
                "POST", "/v1/publish/bench", [("Content-Type", kind)], body, 30
            )
            assert status == 200, answer

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(publishers)))
    upstream.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--publishers", type=int, default=64, help="concurrent publish requests")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="subscriber deliveries in flight"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="events per publish (CloudEvents batch) and per delivery (ACCORD_BULK_MAX)",
    )
    parser.add_argument(
        "--preload", action="store_true", help="publish first; time delivery from a standing start"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        nats = NatsServer(tmp).start()
        sink_port = free_port()
        sink = Process(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(sink_port)],
            tmp / "sink.log",
        ).start()
        assert sink.proc is not None
        _wait_port(sink_port, sink.proc, sink.log)
        pub = Sidecar(
            tmp, "bench-pub", ACCORD_NATS_URL=nats.url, ACCORD_LOG_LEVEL="warning"
        ).start()

        def subscriber() -> Sidecar:
            return Sidecar(
                tmp,
                "bench-sub",
                ACCORD_NATS_URL=nats.url,
                ACCORD_SUBSCRIBE="bench",
                ACCORD_APP_PORT=str(sink_port),
                ACCORD_CONCURRENCY=str(args.concurrency),
                ACCORD_BULK_MAX=str(args.batch),
                ACCORD_LOG_LEVEL="warning",
            ).start()

        sub = None if args.preload else subscriber()
        try:
            started = time.perf_counter()
            publish_s = uvloop.run(publish(pub.http_port, args.events, args.publishers, args.batch))
            if sub is None:  # preloaded: from the subscriber's start to its last delivery
                started = time.perf_counter()
                sub = subscriber()
            deadline = time.monotonic() + 300
            while count(sink_port) < args.events and time.monotonic() < deadline:
                time.sleep(0.02)
            total_s = time.perf_counter() - started
            delivered = count(sink_port)
        finally:
            for p in (sub, pub, sink, nats):
                if p is not None:
                    p.close()
    print(
        f"events: {args.events}, publishers: {args.publishers}, subscriber concurrency: {args.concurrency}, batch: {args.batch}"
    )
    print(f"publish (acked by JetStream): {args.events / publish_s:,.0f} events/s")
    what = "delivery alone (preloaded)" if args.preload else "publish-to-delivery"
    print(
        f"{what}: {delivered:,} delivered in {total_s:.2f}s = {delivered / total_s:,.0f} events/s "
        f"(goal >= 5,000/s)"
    )
    return 0 if delivered == args.events else 1


if __name__ == "__main__":
    raise SystemExit(main())
