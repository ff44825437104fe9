"""A 2PC participant for demos and tests: a ledger in its own SQLite file, made exactly-once
with the participant helper (sdk/python/accord_barrier.py) and normally reached through its
Accord sidecar (the fence).

    python examples/services/ledger.py --port 8091 --db /tmp/ledger-a.db [--name ledger-a]
        [--seed alice=10000 ...]   (opening balances in cents, set once: a restart keeps the db)

POST /prepare {"txid", "payload": {"account", "amountCents"}}  hold the amount; vote commit,
     or abort if a debit would overdraw the account
POST /commit  {"txid"}                                           apply what was held
POST /abort   {"txid"}                                           release what was held
GET  /_state                  balances, holds, committed and aborted txids, calls per phase
POST /_behave {"vote": "abort" | null, "delayMs": N, "fail": N}  how to answer prepares (fail:
     the next N calls of any phase get a 503)
POST /_deposit {"account", "amountCents"}                        seed a balance
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sdk" / "python"))
from accord_barrier import Barrier


class Ledger:
    def __init__(self, db: Path, name: str) -> None:
        self.name = name
        self.conn = sqlite3.connect(db, isolation_level=None)  # transactions: explicit
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.barrier = Barrier()
        self.barrier.create_table(self.conn)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS accounts (account TEXT PRIMARY KEY, cents INTEGER)"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS holds (txid TEXT PRIMARY KEY, account TEXT, cents INTEGER)"
        )
        self.calls: Counter[str] = Counter()
        self.behaviour: dict[str, Any] = {}

    def _tx(self) -> Any:
        conn = self.conn

        class Tx:
            def __enter__(self) -> sqlite3.Connection:
                conn.execute("BEGIN IMMEDIATE")
                return conn

            def __exit__(self, kind: Any, *_: Any) -> None:
                conn.execute("ROLLBACK" if kind else "COMMIT")

        return Tx()

    def prepare(self, txid: str, payload: dict[str, Any]) -> str:
        account, cents = str(payload.get("account", "")), int(payload.get("amountCents", 0))
        with self._tx() as conn:
            vote = self.barrier.prepare(conn, txid)
            if vote is not None:
                return vote  # a duplicate, or an abort came first
            row = conn.execute(
                "SELECT cents FROM accounts WHERE account = ?", (account,)
            ).fetchone()
            held = conn.execute(
                "SELECT COALESCE(SUM(cents), 0) FROM holds WHERE account = ? AND cents < 0",
                (account,),
            ).fetchone()[0]
            balance = row[0] if row else 0
            told = self.behaviour.get("vote")
            short = cents < 0 and balance + held + cents < 0  # a debit would overdraw
            vote = "abort" if told == "abort" or short else "commit"
            if vote == "commit":
                conn.execute("INSERT INTO holds VALUES (?, ?, ?)", (txid, account, cents))
            self.barrier.record_vote(conn, txid, vote)
            return vote

    def commit(self, txid: str) -> None:
        with self._tx() as conn:
            if self.barrier.commit(conn, txid):
                hold = conn.execute(
                    "SELECT account, cents FROM holds WHERE txid = ?", (txid,)
                ).fetchone()
                if hold is not None:
                    conn.execute(
                        "INSERT INTO accounts VALUES (?, ?) ON CONFLICT(account) "
                        "DO UPDATE SET cents = cents + excluded.cents",
                        hold,
                    )
                    conn.execute("DELETE FROM holds WHERE txid = ?", (txid,))

    def abort(self, txid: str) -> None:
        with self._tx() as conn:
            if self.barrier.abort(conn, txid):
                conn.execute("DELETE FROM holds WHERE txid = ?", (txid,))

    def state(self) -> dict[str, Any]:
        c = self.conn
        return {
            "name": self.name,
            "balances": dict(c.execute("SELECT account, cents FROM accounts").fetchall()),
            "holds": {t: [a, n] for t, a, n in c.execute("SELECT * FROM holds").fetchall()},
            "committed": sorted(r[0] for r in c.execute(
                f"SELECT txid FROM {self.barrier.table} WHERE phase = 'commit'")),
            "aborted": sorted(r[0] for r in c.execute(
                f"SELECT txid FROM {self.barrier.table} WHERE phase = 'abort'")),
            "calls": dict(self.calls),
        }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--name", default="ledger")
    parser.add_argument("--seed", action="append", default=[], metavar="ACCOUNT=CENTS")
    args = parser.parse_args()
    ledger = Ledger(Path(args.db), args.name)
    for seed in args.seed:
        account, _, cents = seed.partition("=")
        ledger.conn.execute("INSERT OR IGNORE INTO accounts VALUES (?, ?)", (account, int(cents)))

    async def phase(request: web.Request) -> web.Response:
        kind = request.match_info["phase"]
        body = await request.json()
        ledger.calls[kind] += 1
        if ledger.behaviour.get("fail", 0) > 0:
            ledger.behaviour["fail"] -= 1
            return web.json_response({"error": "told to fail"}, status=503)
        if kind == "prepare" and ledger.behaviour.get("delayMs"):
            await asyncio.sleep(ledger.behaviour["delayMs"] / 1000)
        txid = str(body["txid"])
        ref = request.headers.get("Accord-Transaction-Ref", txid)
        if kind == "prepare":
            vote = ledger.prepare(txid, body.get("payload") or {})
            print(f"{ledger.name}: prepare {ref} -> vote {vote}", flush=True)
            return web.json_response({"vote": vote})
        (ledger.commit if kind == "commit" else ledger.abort)(txid)
        balances = ", ".join(f"{a} {c / 100:.2f}" for a, c in ledger.state()["balances"].items())
        print(f"{ledger.name}: {kind} {ref} -> balances: {balances or 'none'}", flush=True)
        return web.json_response({"ok": True})

    async def state(_: web.Request) -> web.Response:
        return web.json_response(ledger.state())

    async def behave(request: web.Request) -> web.Response:
        ledger.behaviour = await request.json()
        return web.json_response(ledger.behaviour)

    async def deposit(request: web.Request) -> web.Response:
        body = await request.json()
        with ledger._tx() as conn:
            conn.execute(
                "INSERT INTO accounts VALUES (?, ?) ON CONFLICT(account) "
                "DO UPDATE SET cents = cents + excluded.cents",
                (body["account"], int(body["amountCents"])),
            )
        return web.json_response(ledger.state()["balances"])

    app = web.Application()
    app.router.add_get("/_state", state)
    app.router.add_post("/_behave", behave)
    app.router.add_post("/_deposit", deposit)
    app.router.add_post("/{prefix:.*}{phase:prepare|commit|abort}", phase)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
