"""An append-only file of JSON lines, shared by the dedup table and the journal: one
write() per record (a SIGKILL after it returns cannot lose it; with `sync`, neither can a
power loss), replayed at start skipping a torn last line, rewritten atomically to compact."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


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
