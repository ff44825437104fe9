"""A durable, insert-first journal of what a participant was asked, per key: the record is
written (and fsynced) before the app is called, so a decision taken from it never races the
call it guards (no check-then-act). Used by the saga fence (a compensation, once recorded,
fences off a late action of the same step); built to serve 2PC's participant fence too.

One JSON line per record in an append-only file, replayed at start; entries older than the
retention are dropped at start and at compaction, and the table is bounded (oldest first)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from accord_sidecar import jsonl


class Journal:
    def __init__(
        self,
        path: Path | None,
        retention_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.retention_s = retention_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lines = 0
        if path is not None:
            self._load(path)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry[1] > self.retention_s:
            del self._entries[key]
            return None
        return entry[0]

    def record(self, key: str, state: str) -> None:
        """Record `state` for `key`, durably, before the caller acts on it."""
        at = self.clock()
        if self.path is not None:
            # fsync: the fence must hold after a power loss too, not only a SIGKILL.
            jsonl.append(self.path, {"k": key, "s": state, "t": at}, sync=True)
            self._lines += 1
            if self._lines > 2 * self.max_entries + 100:
                self._compact()
        self._entries[key] = (state, at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _load(self, path: Path) -> None:
        now = self.clock()
        for d in jsonl.records(path):
            try:
                key, state, at = str(d["k"]), str(d["s"]), float(d["t"])
            except (KeyError, TypeError, ValueError):
                continue
            if now - at <= self.retention_s:
                self._entries[key] = (state, at)
                self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if path.exists():
            self._compact()

    def _compact(self) -> None:
        assert self.path is not None
        now = self.clock()
        for key in [k for k, (_, at) in self._entries.items() if now - at > self.retention_s]:
            del self._entries[key]
        self._lines = jsonl.rewrite(
            self.path,
            ({"k": k, "s": state, "t": at} for k, (state, at) in self._entries.items()),
            sync=True,
        )
