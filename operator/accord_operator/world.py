"""The world a kind's driver runs in (the shared driver's `World`): real time, the
supervisor's stop flag, and, once a decision is stored, its Events (kopf) and log lines and
its metric increments (each kind names its own)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.decision import Decision


class KubeWorld:
    def __init__(
        self,
        kind: str,
        noun: str,
        logger: logging.Logger,
        counters: Mapping[str, Callable[..., None]],
        wait: Callable[[float], Awaitable[bool]] | None,
    ) -> None:
        self.kind, self.noun, self.logger = kind, noun, logger  # noun: in log lines
        self.counters, self._wait = counters, wait

    def now(self) -> float:
        return time.time()

    async def wait(self, seconds: float) -> bool:
        if self._wait is None:
            await asyncio.sleep(seconds)
            return False
        return await self._wait(seconds)

    def tell(self, obj: dict[str, Any], decision: Decision[Any]) -> None:
        meta = obj["metadata"]
        for kind, reason, message in decision.events:
            kopf.event(obj, type=kind, reason=reason, message=message)
            log = self.logger.warning if kind == "Warning" else self.logger.info
            log("%s %s/%s: %s: %s", self.noun, meta["namespace"], meta["name"], reason, message)
        for what, labels in decision.counts:
            self.counters[what](*labels)
        metrics.RECONCILES.labels(self.kind, "ok").inc()
