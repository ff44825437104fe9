"""Benchmark: a CQRS projection's data path, publish -> read model, on real parts.

A real `nats-server -js`, a publisher's sidecar, and one projector (the sample,
examples/services/projector.py: SQLite, idempotent by event id) behind its sidecar,
subscribed in order as a CQRSProjection's pod is (one delivery in flight). Prints:
- live: events/s from the first publish to the read model holding them all;
- catch-up: how long a new generation takes to project a backlog from the stream's start;
- in the same run, a bare JetStream pull consumer (no sidecar, batches of 256) writing the
  same read model, one database transaction per batch: this design's limit here.
Goal (issue 14): >= 3,000 events/s and >= 50% of the bare consumer.

    .venv/bin/python bench/projection_throughput.py [--live 5000] [--backlog 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import nats  # noqa: E402

import accord_wire as wire  # noqa: E402
from accord_operator.envtest.controlplane import free_port  # noqa: E402
from tests.support.dataplane import NatsServer, Process, Sidecar, _wait_port  # noqa: E402

PROJECTOR = ROOT / "examples" / "services" / "projector.py"
TOPIC = "orders.events"
BATCH = "application/cloudevents-batch+json"


def read_model_class() -> Any:
    spec = importlib.util.spec_from_file_location("projector", PROJECTOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReadModel


async def publish(api: str, start: int, n: int) -> None:
    """n order events in batches of 1,000 (the write side is not what is measured)."""
    async with aiohttp.ClientSession() as session:

        async def one(first: int) -> None:
            events = [
                {"specversion": "1.0", "id": f"o-{i}", "source": "bench", "type": "order",
                 "datacontenttype": "application/json",
                 "data": {"orderId": i, "customer": f"c{i % 97}", "amountCents": i % 1000}}
                for i in range(first, min(first + 1000, start + n))
            ]  # fmt: skip
            async with session.post(f"{api}/v1/publish/{TOPIC}", data=json.dumps(events),
                                    headers={"Content-Type": BATCH}) as r:  # fmt: skip
                assert r.status == 200, await r.text()

        firsts = list(range(start, start + n, 1000))
        for i in range(0, len(firsts), 4):  # 4 batches in flight
            await asyncio.gather(*(one(f) for f in firsts[i : i + 4]))


async def events_in(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/orders") as r:
        return int((await r.json())["events"])


async def wait_for_events(url: str, n: int) -> float:
    """When the read model holds n events (asked every 50 ms)."""
    for _ in iter(int, 1):  # until it does
        if await events_in(url) >= n:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter()


def projector(tmp: Path, name: str, nats_url: str, batch: int) -> tuple[Process, Sidecar, str]:
    port = free_port()
    data = tmp / name
    data.mkdir()
    sidecar = Sidecar(
        tmp, name, ACCORD_NATS_URL=nats_url, ACCORD_SUBSCRIBE=TOPIC, ACCORD_APP_PORT=str(port),
        ACCORD_CONCURRENCY="1", ACCORD_LOG_LEVEL="warning", ACCORD_BULK_MAX=str(batch),
    ).start()  # fmt: skip
    app = Process(
        [sys.executable, str(PROJECTOR), "--port", str(port), "--host", "127.0.0.1",
         "--data", str(data)],
        tmp / f"{name}-app.log",
    ).start()  # fmt: skip
    assert app.proc is not None
    _wait_port(port, app.proc, app.log)
    return app, sidecar, f"http://127.0.0.1:{port}"


async def bare(nats_url: str, tmp: Path, total: int) -> float:
    """A bare pull consumer from the stream's start into the same read model: events/s."""
    model = read_model_class()(tmp / "bare.db", "bare")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(wire.subject(TOPIC), durable="bench-bare", stream=wire.STREAM)
    done = 0
    started = time.perf_counter()
    while done < total:
        msgs = await sub.fetch(batch=256, timeout=5)
        model.apply([json.loads(m.data) for m in msgs])
        await asyncio.gather(*(m.ack() for m in msgs))
        done += len(msgs)
    elapsed = time.perf_counter() - started
    await nc.close()
    return total / elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--live", type=int, default=5000, help="events published while live")
    parser.add_argument("--backlog", type=int, default=100_000, help="events to catch up on")
    parser.add_argument("--batch", type=int, default=100,
                        help="events per delivery (spec.projector.batchSize; 1: one per POST)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = NatsServer(tmp).start()
        processes: list[Process] = [server]
        try:
            publisher = Sidecar(tmp, "orders-api", ACCORD_NATS_URL=server.url,
                                ACCORD_LOG_LEVEL="warning").start()  # fmt: skip
            processes.append(publisher)
            app, sidecar, url = projector(tmp, "orders-g0", server.url, args.batch)
            processes += [app, sidecar]

            async def live() -> float:
                started = time.perf_counter()
                waiting = asyncio.create_task(wait_for_events(url, args.live))
                await publish(publisher.api, 0, args.live)
                return args.live / (await waiting - started)

            live_rate = asyncio.run(live())
            # The backlog: published while no projector of the new generation runs yet.
            asyncio.run(publish(publisher.api, args.live, args.backlog))
            total = args.live + args.backlog

            async def catch_up() -> tuple[float, float]:
                started = time.perf_counter()
                app1, sidecar1, url1 = projector(tmp, "orders-g1", server.url, args.batch)
                processes.extend([app1, sidecar1])
                seconds = await wait_for_events(url1, total) - started
                return seconds, total / seconds

            catch_seconds, catch_rate = asyncio.run(catch_up())
            bare_rate = asyncio.run(bare(server.url, tmp, total))
        finally:
            for p in reversed(processes):
                p.close()
    print(f"one projector behind its sidecar (in order, up to {args.batch} events per "
          "delivery), SQLite read model")  # fmt: skip
    print(f"live: {args.live} events published -> projected at {live_rate:,.0f} events/s")
    print(f"catch-up: a new generation projected a {total:,}-event stream in "
          f"{catch_seconds:.1f} s ({catch_rate:,.0f} events/s)")  # fmt: skip
    print(f"bare JetStream consumer (batches of 256, same read model): {bare_rate:,.0f} events/s")
    print(f"sidecar path / bare: {catch_rate / bare_rate:.0%} (goal >= 50%); "
          f"goal >= 3,000 events/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
