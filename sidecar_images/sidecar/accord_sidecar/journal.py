"""A durable, insert-first journal of what a participant was asked, per key: the record is
written (and fsynced) before the app is called, so a decision taken from it never races the
call it guards (no check-then-act). Used by the saga fence (a compensation, once recorded,
fences off a late action of the same step); built to serve 2PC's participant fence too.

The expiring, bounded, file-backed table of accord_sidecar.jsonl, with fsync on every
record and entries kept for the retention."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accord_sidecar.jsonl import ExpiringLog


def _decode(d: dict[str, Any]) -> str:
    return str(d["s"])


class Journal(ExpiringLog[str]):
    """Saga pairs (state "compensation"), 2PC transactions ("tpc/<txid>": the fence's
    state) and where a transaction lives ("tpc-ref/<txid>": JSON [namespace/name, path
    prefix])."""

    def __init__(
        self,
        path: Path | None,
        retention_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # fsync: the fence must hold after a power loss too, not only a SIGKILL.
        super().__init__(
            max_entries=max_entries, ttl_s=retention_s, encode=lambda s: {"s": s},
            decode=_decode, path=path, sync=True, clock=clock,
        )  # fmt: skip

    def record(self, key: str, state: str) -> None:
        """Record `state` for `key`, durably, before the caller acts on it."""
        self.put(key, state)
