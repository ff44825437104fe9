"""The inbound dedup table: completed responses by idempotency key, LRU + TTL bounded,
optionally kept in an append-only file so that a sidecar restart keeps it."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accord_sidecar.jsonl import ExpiringLog


@dataclass(frozen=True)
class Stored:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    at: float


def _encode(e: Stored) -> dict[str, Any]:
    return {"s": e.status, "h": e.headers, "b": base64.b64encode(e.body).decode()}


def _decode(d: dict[str, Any]) -> Stored:
    headers = [(str(k), str(v)) for k, v in d["h"]]
    return Stored(int(d["s"]), headers, base64.b64decode(d["b"]), float(d["t"]))


class DedupTable(ExpiringLog[Stored]):
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Written without fsync: a SIGKILL after the write() cannot lose it (page cache),
        # and a lost answer is only sent to the app again under the same key.
        super().__init__(
            max_entries=max_entries, ttl_s=ttl_s, encode=_encode, decode=_decode,
            path=path, clock=clock,
        )  # fmt: skip

    def put(self, key: str, entry: Stored, at: float | None = None) -> None:
        """An answer expires `ttl_s` after it was given (its `at`)."""
        super().put(key, entry, entry.at if at is None else at)
