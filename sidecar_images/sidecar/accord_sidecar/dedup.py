"""The inbound dedup table: completed responses by idempotency key, LRU + TTL bounded,
optionally kept in an append-only file so that a sidecar restart keeps it."""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accord_sidecar import jsonl


@dataclass(frozen=True)
class Stored:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    at: float


def _record(key: str, e: Stored) -> dict[str, Any]:
    return {
        "k": key,
        "s": e.status,
        "h": e.headers,
        "b": base64.b64encode(e.body).decode(),
        "t": e.at,
    }


class DedupTable:
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self.path = path
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        self._lines = 0
        if path is not None:
            self._load(path)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Stored | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry.at > self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Stored) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if self.path is not None:
            self._append(key, entry)

    # -- file backing: one JSON line per entry; compacted when it doubles the table ----------
    def _append(self, key: str, entry: Stored) -> None:
        assert self.path is not None
        jsonl.append(self.path, _record(key, entry))
        self._lines += 1
        if self._lines > 2 * self.max_entries + 100:
            self._compact()

    def _load(self, path: Path) -> None:
        now = self.clock()
        for d in jsonl.records(path):
            try:
                entry = Stored(
                    int(d["s"]), [tuple(h) for h in d["h"]], base64.b64decode(d["b"]), float(d["t"])
                )
            except (ValueError, KeyError, TypeError):
                continue
            if now - entry.at <= self.ttl_s:
                self._entries[d["k"]] = entry
                self._entries.move_to_end(d["k"])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if path.exists():
            self._compact()

    def _compact(self) -> None:
        assert self.path is not None
        self._lines = jsonl.rewrite(self.path, (_record(k, e) for k, e in self._entries.items()))
