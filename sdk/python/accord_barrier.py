"""accord_barrier: exactly-once 2PC effects for a participant, inside its own database
transaction (any DB-API 2.0 connection: sqlite3, psycopg, ...).

The Accord sidecar's fence makes prepare, commit and abort idempotent per transaction, but
its journal is not the app's database: a crash between the app's write and the journal's
can repeat an effect. This helper keeps one barrier row per (transaction, phase) in the
app's own tables, written in the same database transaction as the effect, so the effect
and the barrier commit together or not at all.

    barrier = Barrier()                      # paramstyle "qmark" (sqlite3); "format" for psycopg
    barrier.create_table(conn)
    with conn:                               # one database transaction
        vote = barrier.prepare(conn, txid)   # None: first time, do the work now
        if vote is None:
            vote = "commit" if reserve(conn, payload) else "abort"
            barrier.record_vote(conn, txid, vote)
    ...
    with conn:
        if barrier.commit(conn, txid):       # True: first time, apply now
            apply(conn, txid)
    with conn:
        if barrier.abort(conn, txid):        # True: there is a prepare to undo
            release(conn, txid)

An abort that arrives before its prepare leaves a barrier row that makes that prepare vote
abort without doing anything (no suspended reservation); a duplicate of any phase does
nothing. Needs INSERT ... ON CONFLICT DO NOTHING (SQLite >= 3.24, PostgreSQL >= 9.5).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Barrier"]

_PLACEHOLDER = {"qmark": "?", "format": "%s", "pyformat": "%s"}


class Barrier:
    def __init__(self, table: str = "accord_barrier", paramstyle: str = "qmark") -> None:
        if not table.replace("_", "").isalnum():
            raise ValueError(f"{table!r} is not a plain table name")
        self.table = table
        self.p = _PLACEHOLDER[paramstyle]

    def create_table(self, conn: Any) -> None:
        cur = conn.cursor()
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " txid VARCHAR(255) NOT NULL, phase VARCHAR(16) NOT NULL, note VARCHAR(16),"
            " PRIMARY KEY (txid, phase))"
        )
        conn.commit()

    def _insert(self, conn: Any, txid: str, phase: str, note: str) -> bool:
        cur = conn.cursor()
        cur.execute(
            f"INSERT INTO {self.table} (txid, phase, note) VALUES ({self.p}, {self.p}, {self.p})"
            " ON CONFLICT DO NOTHING",
            (txid, phase, note),
        )
        return bool(cur.rowcount == 1)

    def _note(self, conn: Any, txid: str, phase: str) -> str | None:
        cur = conn.cursor()
        cur.execute(
            f"SELECT note FROM {self.table} WHERE txid = {self.p} AND phase = {self.p}",
            (txid, phase),
        )
        row = cur.fetchone()
        return None if row is None else str(row[0])

    def prepare(self, conn: Any, txid: str) -> str | None:
        """None: the first prepare of txid, do the work now and record_vote in this same
        database transaction. Otherwise the vote to answer without doing anything: the
        recorded one for a duplicate, "abort" when the abort came first."""
        if self._insert(conn, txid, "prepare", "pending"):
            return None
        note = self._note(conn, txid, "prepare")
        return note if note in ("commit", "abort") else "abort"

    def record_vote(self, conn: Any, txid: str, vote: str) -> None:
        cur = conn.cursor()
        cur.execute(
            f"UPDATE {self.table} SET note = {self.p} WHERE txid = {self.p} AND phase = 'prepare'",
            (vote, txid),
        )

    def commit(self, conn: Any, txid: str) -> bool:
        """True the first time: apply the prepared work now, in this database transaction."""
        return self._insert(conn, txid, "commit", "done")

    def abort(self, conn: Any, txid: str) -> bool:
        """True when there is a prepare to undo (the first abort after a prepare). An abort
        before any prepare records that, so the late prepare does nothing."""
        if self._insert(conn, txid, "prepare", "aborted"):
            self._insert(conn, txid, "abort", "empty")
            return False
        return self._insert(conn, txid, "abort", "done")
