"""The saga on the shared driver (accord_operator.driver): its store (the API server, with
optimistic concurrency), its world (real time, Events, metrics) and its calls (steps.perform).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.decision import Decision
from accord_operator.driver import Driver
from accord_operator.kubeapi import ApiError, KubeApi
from accord_operator.participants import Participants
from accord_operator.resources import GROUP, SAGA, VERSION
from accord_operator.saga.machine import (
    COMPENSATED,
    FINISHED_AS,
    PHASE,
    RETRY,
    Call,
    Outcome,
    SagaMachine,
)
from accord_operator.saga.steps import perform
from accord_wire import REDRIVE, SKIP_COMPENSATION

__all__ = ["REDRIVE", "SKIP_COMPENSATION", "SagaDriver", "skip_compensation"]

logger = logging.getLogger("accord.saga")
_locks: dict[str, asyncio.Lock] = {}


def _path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{SAGA.plural}/{name}"


class SagaDriver:
    """Runs each saga on the shared driver, one at a time per saga (the daemon and the
    delete handler may both ask)."""

    def __init__(self, api: KubeApi, participants: Participants) -> None:
        self.api = api
        self.participants = participants

    async def drive(
        self,
        namespace: str,
        name: str,
        *,
        deleting: bool = False,
        wait: Callable[[float], Awaitable[bool]] | None = None,
        annotations: Callable[[], Mapping[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Run the saga until it is terminal (returns its status) or `wait` says stop.

        `wait(seconds)` sleeps and returns True when the caller wants us to stop
        (kopf's daemon flag); without it the drive runs to a terminal phase.
        `annotations()` reads them from kopf's live view of the object (no API call).
        """
        store = KubeStore(self.api, _path(namespace, name), annotations)
        saga = await store.read()
        lock = _locks.setdefault(saga["metadata"]["uid"], asyncio.Lock())
        async with lock:
            loop: Driver[Call, Outcome] = Driver(
                SagaMachine(deleting=deleting), store, self._act, SagaWorld(wait)
            )
            return await loop.run(watch_finished=wait is not None and not deleting)

    async def _act(self, call: Call, saga: dict[str, Any], status: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        outcome = await perform(call, saga, status, self.api, self.participants)
        if outcome.ok:
            metrics.SAGA_STEP_SECONDS.labels(call.kind).observe(time.perf_counter() - started)
        return outcome


class SagaWorld:
    """Real time, kopf's stop flag, and Events and metrics once a decision is stored."""

    def __init__(self, wait: Callable[[float], Awaitable[bool]] | None) -> None:
        self._wait = wait

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
            log = logger.warning if kind == "Warning" else logger.info
            log("saga %s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)
        for what, labels in decision.counts:
            COUNTERS[what](*labels)
        metrics.RECONCILES.labels(SAGA.kind, "ok").inc()


COUNTERS: dict[str, Callable[..., None]] = {
    RETRY: lambda kind: metrics.SAGA_RETRIES.labels(kind).inc(),
    COMPENSATED: lambda: metrics.SAGA_COMPENSATIONS.inc(),
    FINISHED_AS: lambda phase: metrics.SAGAS.labels(phase).inc(),
    PHASE: lambda phase: metrics.PHASE_TRANSITIONS.labels(SAGA.kind, phase).inc(),
}


class KubeStore:
    """A resource's status in the API server, written with optimistic concurrency."""

    def __init__(
        self, api: KubeApi, path: str, annotations: Callable[[], Mapping[str, str]] | None
    ) -> None:
        self.api, self.path, self._annotations = api, path, annotations

    async def read(self) -> dict[str, Any]:
        obj: dict[str, Any] = await self.api.get(self.path)
        return obj

    async def refresh(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self._annotations is not None:
            meta = {**obj["metadata"], "annotations": dict(self._annotations())}
        else:
            meta = (await self.read())["metadata"]
        return {**obj, "metadata": meta}

    async def write(
        self, obj: dict[str, Any], status: dict[str, Any], written: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Store status over the one we last wrote. None when stored; else the object as it
        is now, because someone else changed its status or spec (decide again from it). A
        change of metadata only (kopf's annotations and finalizer) is written over."""
        meta = obj["metadata"]
        while not await self._patch(meta, status):
            fresh = await self.read()
            if dict(fresh.get("status") or {}) != written or fresh["spec"] != obj["spec"]:
                logger.info("%s changed meanwhile: deciding again", self.path)
                return fresh
            meta.clear()
            meta.update(fresh["metadata"])
        return None

    async def _patch(self, meta: dict[str, Any], status: dict[str, Any]) -> bool:
        """Store the status over the version it was decided from; False if the object
        changed meanwhile (a stale writer never overwrites a newer decision)."""
        try:
            answer = await self.api.request(
                "PATCH",
                self.path + "/status",
                [
                    # A resourceVersion in the patch is a precondition: 409 if it moved on.
                    {"op": "replace", "path": "/metadata/resourceVersion",
                     "value": meta["resourceVersion"]},
                    {"op": "add", "path": "/status", "value": status},
                ],
                content_type="application/json-patch+json",
            )  # fmt: skip
        except ApiError as exc:
            if exc.status == 404:
                raise kopf.PermanentError(f"{self.path} is gone") from None
            if exc.status == 409:
                logger.info("%s changed meanwhile: deciding again", self.path)
                return False
            raise
        meta["resourceVersion"] = answer["metadata"]["resourceVersion"]
        return True


async def sweep_expired(
    expiring: Mapping[tuple[str, str], Any], api: KubeApi, every: float = 5.0
) -> None:
    """Delete finished sagas whose ttlSecondsAfterFinished has passed. `expiring` is kopf's
    index of them ({(namespace, name): [(uid, expires_at)]}, kept up to date by the watch
    kopf already runs): one task for all of them, and no API call until one is due."""
    asked: set[str] = set()
    while True:
        now = time.time()
        for (namespace, name), entries in list(expiring.items()):
            for uid, at in list(entries):
                if at > now or uid in asked:
                    continue
                try:
                    # Only that saga: not a new one created since under the same name.
                    await api.request(
                        "DELETE",
                        _path(namespace, name),
                        {"preconditions": {"uid": uid}, "propagationPolicy": "Background"},
                    )
                    logger.info(
                        "saga %s/%s deleted: ttlSecondsAfterFinished passed", namespace, name
                    )
                except ApiError as exc:
                    if exc.status not in (404, 409):
                        logger.warning("deleting expired saga %s/%s: %s", namespace, name, exc)
                        continue
                asked.add(uid)
        asked &= {uid for entries in expiring.values() for uid, _ in entries}
        await asyncio.sleep(every)


def skip_compensation(body: kopf.Body) -> bool:
    return (body.metadata.annotations or {}).get(SKIP_COMPENSATION, "").lower() in (
        "true",
        "1",
        "yes",
    )
