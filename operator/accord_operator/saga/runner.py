"""Driving one saga: read, decide, write ahead, call, record, write, sleep. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.kubeapi import ApiError, KubeApi
from accord_operator.participants import Participants
from accord_operator.resources import GROUP, SAGA, VERSION
from accord_operator.saga.machine import TERMINAL, Decision, Outcome, decide, record
from accord_operator.saga.steps import perform

REDRIVE = "accord.dev/redrive"
SKIP_COMPENSATION = "accord.dev/skip-compensation"
IDLE_POLL_S = 2.0  # a terminal saga only waits for a redrive annotation

logger = logging.getLogger("accord.saga")
_locks: dict[str, asyncio.Lock] = {}


def _path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{SAGA.plural}/{name}"


class SagaDriver:
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
    ) -> str:
        """Run the saga until it is terminal (returns its phase) or `wait` says stop.

        `wait(seconds)` sleeps and returns True when the caller wants us to stop
        (kopf's daemon flag); without it the drive runs to a terminal phase.
        `annotations()` reads them from kopf's live view of the object (no API call).
        """
        saga = await self.api.get(_path(namespace, name))
        lock = _locks.setdefault(saga["metadata"]["uid"], asyncio.Lock())
        async with lock:
            return await self._drive(saga, deleting, wait, annotations)

    async def _drive(
        self,
        saga: dict[str, Any],
        deleting: bool,
        wait: Callable[[float], Awaitable[bool]] | None,
        annotations: Callable[[], Mapping[str, str]] | None,
    ) -> str:
        meta = saga["metadata"]
        status: dict[str, Any] = dict(saga.get("status") or {})
        written = status
        # What was decided since the last write: told (Events, metrics) once it is stored.
        pending: list[tuple[dict[str, Any], Decision]] = []
        while True:
            redrive = (meta.get("annotations") or {}).get(REDRIVE)
            d = decide(
                saga["spec"],
                status,
                uid=meta["uid"],
                now=time.time(),
                generation=int(meta.get("generation", 1)),
                deleting=deleting,
                redrive=redrive,
            )
            pending.append((status, d))
            status = d.status
            # One write per round: the outcomes of the last calls together with the
            # write-ahead of the next ones. Nothing is called before it is stored, and it is
            # stored only over the version it was decided from (another writer wins: re-read
            # and decide again; calls in flight are repeated under their idempotency keys).
            if status != written:
                fresh = await self._store(saga, status, written)
                if fresh is not None:
                    saga = fresh
                    meta = saga["metadata"]
                    status = written = dict(saga.get("status") or {})
                    pending.clear()
                    continue
                written = status
            for old, done in pending:
                self._account(saga, old, done)
            pending.clear()
            if d.calls:
                outcomes = await asyncio.gather(
                    *(self._timed(call, saga, status) for call in d.calls)
                )
                for outcome in outcomes:
                    r = record(
                        saga["spec"],
                        status,
                        outcome,
                        now=time.time(),
                        generation=int(meta.get("generation", 1)),
                    )
                    pending.append((status, r))
                    status = r.status
                continue
            phase = str(status.get("phase"))
            if phase in TERMINAL and (wait is None or deleting):
                return phase
            delay = (
                IDLE_POLL_S
                if phase in TERMINAL or d.wake_at is None
                else max(0.0, d.wake_at - time.time())
            )
            if wait is None:
                await asyncio.sleep(min(delay, 5.0))
            elif await wait(min(delay, 5.0)):
                return phase
            if phase in TERMINAL:
                # Only a new redrive annotation can move a terminal saga.
                if annotations is not None:
                    meta = {**meta, "annotations": dict(annotations())}
                else:
                    meta = (await self.api.get(_path(meta["namespace"], meta["name"])))["metadata"]

    async def _timed(self, call: Any, saga: dict[str, Any], status: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        outcome = await perform(call, saga, status, self.api, self.participants)
        if outcome.ok:
            metrics.SAGA_STEP_SECONDS.labels(call.kind).observe(time.perf_counter() - started)
        return outcome

    def _account(self, saga: dict[str, Any], old: dict[str, Any], d: Decision) -> None:
        """Events and metrics for a decision that is stored."""
        for kind, reason, message in d.events:
            kopf.event(saga, type=kind, reason=reason, message=message)
        _count(old, d.status)

    async def _store(
        self, saga: dict[str, Any], status: dict[str, Any], written: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Store status over the one we last wrote. None when stored; else the saga as it is
        now, because someone else changed its status or spec (decide again from it). A
        change of metadata only (kopf's annotations and finalizer) is written over."""
        meta = saga["metadata"]
        while not await self._patch(saga, status):
            fresh: dict[str, Any] = await self.api.get(_path(meta["namespace"], meta["name"]))
            if dict(fresh.get("status") or {}) != written or fresh["spec"] != saga["spec"]:
                logger.info(
                    "saga %s/%s changed meanwhile: deciding again", meta["namespace"], meta["name"]
                )
                return fresh
            meta.clear()
            meta.update(fresh["metadata"])
        return None

    async def _patch(self, saga: dict[str, Any], status: dict[str, Any]) -> bool:
        """Store the status over the version it was decided from; False if the saga changed
        meanwhile (optimistic concurrency: a stale writer never overwrites a newer decision)."""
        meta = saga["metadata"]
        try:
            answer = await self.api.request(
                "PATCH",
                _path(meta["namespace"], meta["name"]) + "/status",
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
                raise kopf.PermanentError("the saga is gone") from None
            if exc.status == 409:
                logger.info(
                    "saga %s/%s changed meanwhile: deciding again", meta["namespace"], meta["name"]
                )
                return False
            raise
        meta["resourceVersion"] = answer["metadata"]["resourceVersion"]
        return True


def _count(old: dict[str, Any], new: dict[str, Any]) -> None:
    before = {s["name"]: s for s in old.get("steps", [])}
    for s in new.get("steps", []):
        prev = before.get(s["name"], {})
        if s.get("nextAttemptAt") and s.get("nextAttemptAt") != prev.get("nextAttemptAt"):
            metrics.SAGA_RETRIES.labels(
                "compensation" if s["phase"] == "Compensating" else "action"
            ).inc()
        if s["phase"] == "Compensated" and prev.get("phase") != "Compensated":
            metrics.SAGA_COMPENSATIONS.inc()
    if new.get("phase") in TERMINAL and old.get("phase") != new.get("phase"):
        metrics.SAGAS.labels(new["phase"]).inc()


def skip_compensation(body: kopf.Body) -> bool:
    return (body.metadata.annotations or {}).get(SKIP_COMPENSATION, "").lower() in (
        "true",
        "1",
        "yes",
    )
