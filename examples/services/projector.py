"""A projector for demos and tests: the read side of CQRS for order events. Its sidecar
delivers the topic's events (POST /events/<topic>, one CloudEvent or a batch); it keeps
"orders by customer" in SQLite, one database per read model generation
(ACCORD_PROJECTION_GENERATION, set by the operator), idempotent by event id: an event
delivered twice counts once.

    python examples/services/projector.py --port 8080 [--data /data]

Events: data {"orderId", "customer", "amountCents"}.
GET  /orders          {"generation", "events", "customers": {c: {"orders", "amountCents"}}}
     ?minSequence=S    read your writes: first waits (up to 5 s) until its sidecar has every
                       event up to stream sequence S (what the writer's /v1/publish returned)
                       projected; 504 if not
GET  /healthz         200 once the read model is open
POST /projection/reset   (--in-place: one read model for all generations) empty it for this
                  generation, once: its sidecar calls it before a new generation's replay
--forward URL      each delivery's applied events ({"id", "partitionkey"}) are also POSTed
                  there before it is answered: one log for several replicas (tests)
POST /_behave {"delayMs": N, "failIds": [...]}   how long each delivery takes (tests make
                  lag this way); events it answers 500 for (a poison event)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, web


class ReadModel:
    def __init__(self, path: Path, generation: str) -> None:
        self.generation = generation
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY)")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS customers "
            "(customer TEXT PRIMARY KEY, orders INTEGER, cents INTEGER)"
        )

    def reset(self, generation: str) -> bool:
        """Empty the read model for `generation` (in-place rebuilds), unless it already is
        that generation's: a repeat (another partition's sidecar, a restart) is a no-op.
        Whether it emptied it."""
        c = self.conn
        c.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        row = c.execute("SELECT v FROM meta WHERE k = 'generation'").fetchone()
        if row is not None and row[0] == generation:
            return False
        c.execute("BEGIN IMMEDIATE")
        c.execute("DELETE FROM seen")
        c.execute("DELETE FROM customers")
        c.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (generation,))
        c.execute("COMMIT")
        self.generation = generation
        return True

    def apply(self, events: list[dict[str, Any]]) -> None:
        """One database transaction per delivery: all of it or none of it."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for event in events:
                new = c.execute("INSERT OR IGNORE INTO seen VALUES (?)", (str(event.get("id")),))
                if new.rowcount == 0:
                    continue  # delivered again: already counted
                data = event.get("data") if isinstance(event.get("data"), dict) else {}
                customer = str(data.get("customer", "unknown"))
                cents = int(data.get("amountCents", 0))
                c.execute(
                    "INSERT INTO customers VALUES (?, 1, ?) ON CONFLICT(customer) DO UPDATE "
                    "SET orders = orders + 1, cents = cents + excluded.cents",
                    (customer, cents),
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def summary(self) -> dict[str, Any]:
        c = self.conn
        return {
            "generation": self.generation,
            "events": c.execute("SELECT COUNT(*) FROM seen").fetchone()[0],
            "customers": {
                name: {"orders": n, "amountCents": cents}
                for name, n, cents in c.execute("SELECT * FROM customers ORDER BY customer")
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default="0.0.0.0")  # the query Service reaches it directly
    parser.add_argument("--data", default=os.environ.get("PROJECTOR_DATA", "/tmp"))
    parser.add_argument(
        "--forward", metavar="URL", help="also POST what each delivery applied here (a log)"
    )
    parser.add_argument("--in-place", action="store_true",
                        help="one read model for every generation (in-place rebuilds)")  # fmt: skip
    args = parser.parse_args()
    generation = os.environ.get("ACCORD_PROJECTION_GENERATION", "0")
    db = "orders.db" if args.in_place else f"orders-g{generation}.db"
    model = ReadModel(Path(args.data) / db, generation)
    behaviour: dict[str, Any] = {}

    async def events(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        batch = body if isinstance(body, list) else [body]
        if behaviour.get("delayMs"):
            await asyncio.sleep(behaviour["delayMs"] / 1000)
        events = [e for e in batch if isinstance(e, dict)]
        poison = set(behaviour.get("failIds") or ()) & {e.get("id") for e in events}
        if poison and not isinstance(body, list):
            return web.json_response({"error": f"cannot apply {sorted(poison)}"}, status=500)
        # In a batch, an event it cannot apply holds back the later ones of its key (order
        # per key): those are answered RETRY too, the rest applied.
        blocked: set[str] = set()
        held: set[Any] = set()
        for e in events:
            key = str(e.get("partitionkey", e.get("id")))
            if e.get("id") in poison or key in blocked:
                blocked.add(key)
                held.add(e.get("id"))
        applied = [e for e in events if e.get("id") not in held]
        if args.forward and applied:  # before answering: the log is in delivery order
            shared = [{"id": e.get("id"), "partitionkey": e.get("partitionkey"),
                       "generation": generation} for e in applied]  # fmt: skip
            try:
                async with ClientSession() as session, session.post(args.forward, json=shared) as r:
                    if r.status >= 300:
                        return web.json_response({"error": "forward refused"}, status=503)
            except (OSError, ClientError) as exc:
                return web.json_response({"error": f"forward failed: {exc}"}, status=503)
        model.apply(applied)
        if isinstance(body, list):  # a batch: answered per event (those it could not: RETRY)
            return web.json_response({"statuses": [
                {"id": e.get("id"), "status": "RETRY" if e.get("id") in held else "SUCCESS"}
                for e in events
            ]})  # fmt: skip
        return web.json_response({"status": "SUCCESS"})

    topic = os.environ.get("ACCORD_PROJECTION_TOPIC", "orders.events")
    sidecar = f"http://127.0.0.1:{os.environ.get('ACCORD_SIDECAR_HTTP_PORT', '3500')}"

    async def orders(request: web.Request) -> web.Response:
        at_least = request.query.get("minSequence")
        if at_least is not None:
            url = f"{sidecar}/v1/subscriptions/{topic}/processed"
            params = {"atLeast": at_least, "timeoutMs": "5000"}
            async with ClientSession() as session, session.get(url, params=params) as r:
                if r.status != 200:
                    return web.json_response(await r.json(), status=r.status)
        return web.json_response(model.summary())

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def behave(request: web.Request) -> web.Response:
        behaviour.clear()
        behaviour.update(await request.json())
        return web.json_response(behaviour)

    async def reset(_: web.Request) -> web.Response:
        emptied = model.reset(generation)
        print(f"projector: reset to generation {generation}: "
              f"{'emptied' if emptied else 'already it'}", flush=True)  # fmt: skip
        return web.json_response({"generation": generation, "emptied": emptied})

    app = web.Application()
    app.router.add_post("/projection/reset", reset)
    app.router.add_post("/events/{topic}", events)
    app.router.add_get("/orders", orders)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_behave", behave)
    print(f"projector: read model generation {generation} on :{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
