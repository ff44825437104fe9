"""A durable, insert-first journal of what a participant was asked, per key: the record is
written (and fsynced) before the app is called, so a decision taken from it never races the
call it guards (no check-then-act). Used by the saga fence (a compensation, once recorded,
fences off a late action of the same step); built to serve 2PC's participant fence too.

One JSON line per record in an append-only file, replayed at start; entries older than the
retention are dropped at start and at compaction, and the table is bounded (oldest first)."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path


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
            self._append(json.dumps({"k": key, "s": state, "t": at}))
        self._entries[key] = (state, at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _append(self, line: str) -> None:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)  # the fence must hold after a power loss too, not only a SIGKILL
        finally:
            os.close(fd)
        self._lines += 1
        if self._lines > 2 * self.max_entries + 100:
            self._compact()

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        now = self.clock()
        for raw in path.read_text(errors="replace").splitlines():
            try:
                d = json.loads(raw)
                key, state, at = str(d["k"]), str(d["s"]), float(d["t"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: that call was never made
            if now - at <= self.retention_s:
                self._entries[key] = (state, at)
                self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self._compact()

    def _compact(self) -> None:
        assert self.path is not None
        now = self.clock()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for key, (state, at) in list(self._entries.items()):
                if now - at > self.retention_s:
                    del self._entries[key]
                    continue
                f.write(json.dumps({"k": key, "s": state, "t": at}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._entries)
