"""An order-summary projector for the demo: the read side fed by the saga participants'
events (shop.py --events shop.orders). Its sidecar delivers them in order per order id (the
partition key), one CloudEvent or a batch; it keeps one row per order in SQLite, one database
per read model generation, idempotent by event id.

    python examples/services/order_summary.py --port 8080 [--data /tmp]

GET  /orders        {"generation", "events", "orders": {id: {"status", "steps": [...]}}}
GET  /orders/<id>   one order
GET  /healthz       200 once the read model is open

An order's status follows its steps: reserve -> Reserved, charge -> Paid, ship -> Shipped; a
refused step -> Declined at <step>; a compensation (release, refund, recall) -> Cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web

PROGRESS = {"reserve": "Reserved", "charge": "Paid", "ship": "Shipped"}
UNDO = {"release", "refund", "recall"}


class Summary:
    def __init__(self, path: Path, generation: str) -> None:
        self.generation = generation
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY)")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, status TEXT, steps TEXT)"
        )

    def apply(self, events: list[dict[str, Any]]) -> None:
        """One transaction per delivery; an event seen before changes nothing."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for event in events:
                if c.execute("INSERT OR IGNORE INTO seen VALUES (?)", (str(event.get("id")),)
                             ).rowcount == 0:  # fmt: skip
                    continue
                data = event.get("data") if isinstance(event.get("data"), dict) else {}
                order, action = str(data.get("orderId")), str(data.get("action", ""))
                row = c.execute("SELECT status, steps FROM orders WHERE id = ?", (order,))
                status, steps = next(iter(row.fetchall()), ("New", "[]"))
                steps_list = [*json.loads(steps), f"{data.get('role')}: {action}"]
                if data.get("status") == "refused":
                    status = f"Declined at {action}"
                elif action in UNDO:
                    status = "Cancelled" if not status.startswith("Declined") else status
                elif action in PROGRESS:
                    status = PROGRESS[action]
                c.execute("INSERT OR REPLACE INTO orders VALUES (?, ?, ?)",
                          (order, status, json.dumps(steps_list)))  # fmt: skip
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def orders(self) -> dict[str, Any]:
        rows = self.conn.execute("SELECT id, status, steps FROM orders ORDER BY id")
        return {i: {"status": s, "steps": json.loads(steps)} for i, s, steps in rows}

    def summary(self) -> dict[str, Any]:
        events = self.conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        return {"generation": self.generation, "events": events, "orders": self.orders()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default="0.0.0.0")  # the query Service reaches it directly
    parser.add_argument("--data", default="/tmp")
    args = parser.parse_args()
    generation = os.environ.get("ACCORD_PROJECTION_GENERATION", "0")
    model = Summary(Path(args.data) / f"order-summary-g{generation}.db", generation)

    async def events(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        model.apply([e for e in (body if isinstance(body, list) else [body])
                     if isinstance(e, dict)])  # fmt: skip
        return web.json_response({"status": "SUCCESS"})

    async def orders(_: web.Request) -> web.Response:
        return web.json_response(model.summary())

    async def order(request: web.Request) -> web.Response:
        found = model.orders().get(request.match_info["id"])
        if found is None:
            return web.json_response({"error": "no such order"}, status=404)
        return web.json_response(found)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/events/{topic}", events)
    app.router.add_get("/orders", orders)
    app.router.add_get("/orders/{id}", order)
    app.router.add_get("/healthz", healthz)
    print(f"order-summary: read model generation {generation} on :{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
