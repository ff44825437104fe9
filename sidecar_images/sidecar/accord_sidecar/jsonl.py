"""An append-only file of JSON lines, and the expiring table kept in one (the dedup table
and the saga journal): one
write() per record (a SIGKILL after it returns cannot lose it; with `sync`, neither can a
power loss), replayed at start skipping a torn last line, rewritten atomically to compact."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar


def append(path: Path, record: dict[str, Any], *, sync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def records(path: Path) -> Iterator[dict[str, Any]]:
    """Every whole record in the file (none if it does not exist)."""
    if not path.exists():
        return
    for raw in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a torn last line after a crash
        if isinstance(record, dict):
            yield record


def rewrite(path: Path, records: Iterable[dict[str, Any]], *, sync: bool = False) -> int:
    """Replace the file with `records`, atomically; how many were written."""
    tmp = path.with_suffix(".tmp")
    count = 0
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


V = TypeVar("V")


class ExpiringLog(Generic[V]):
    """A map of key -> value, bounded (the oldest goes first) and expiring (`ttl_s` after it
    was put, or after the time given with it), optionally kept in an append-only file of
    JSON lines: replayed at start, compacted when the file holds twice the table. Each line
    is {"k": key, "t": put at, **encode(value)}. The dedup table and the saga journal are
    both this."""

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_s: float,
        encode: Callable[[V], dict[str, Any]],
        decode: Callable[[dict[str, Any]], V],
        path: Path | None = None,
        sync: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries, self.ttl_s, self.path, self.sync, self.clock = (
            max_entries, ttl_s, path, sync, clock,
        )  # fmt: skip
        self._encode, self._decode = encode, decode
        self._entries: OrderedDict[str, tuple[V, float]] = OrderedDict()
        self._lines = 0
        if path is not None and path.exists():
            now = clock()
            for d in records(path):
                try:
                    key, at, value = str(d["k"]), float(d["t"]), decode(d)
                except (KeyError, TypeError, ValueError):
                    continue
                if now - at <= ttl_s:
                    self._entries[key] = (value, at)
                    self._entries.move_to_end(key)
            self._trim()
            self._compact()

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, tuple[V, float]]]:
        """Every entry as (key, (value, put at)), expired ones included."""
        return list(self._entries.items())

    def collect(self, batch: int = 1000) -> int:
        """Drop up to `batch` expired entries, least recently used first (a bounded step:
        a big journal is collected a little at a time, never in one long pause)."""
        now = self.clock()
        gone = 0
        for key, (_, at) in list(self._entries.items()):
            if gone >= batch:
                break
            if now - at > self.ttl_s:
                del self._entries[key]
                gone += 1
        return gone

    def get(self, key: str, *, touch: bool = True) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry[1] > self.ttl_s:
            del self._entries[key]
            return None
        if touch:
            self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V, at: float | None = None) -> None:
        """Keep `value` for `key` from `at` (default now); with a file, written (and
        synced if asked) first."""
        at = self.clock() if at is None else at
        if self.path is not None:
            append(self.path, {"k": key, "t": at, **self._encode(value)}, sync=self.sync)
            self._lines += 1
            if self._lines > 2 * self.max_entries + 100:
                self._compact()
        self._entries[key] = (value, at)
        self._entries.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _compact(self) -> None:
        assert self.path is not None
        now = self.clock()
        for key in [k for k, (_, at) in self._entries.items() if now - at > self.ttl_s]:
            del self._entries[key]
        self._lines = rewrite(
            self.path,
            ({"k": k, "t": at, **self._encode(v)} for k, (v, at) in self._entries.items()),
            sync=self.sync,
        )
