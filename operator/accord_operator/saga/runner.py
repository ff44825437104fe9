"""The saga on the shared driver (accord_operator.driver): its store (the API server, with
optimistic concurrency), its world (real time, Events, metrics) and its calls (steps.perform).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from accord_operator import metrics
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
    expires_at,
    needs_controller,
)
from accord_operator.saga.steps import perform
from accord_operator.store import KubeStore, finalizer_removal, hold_finalizer
from accord_operator.world import KubeWorld
from accord_wire import REDRIVE, SKIP_COMPENSATION

__all__ = ["REDRIVE", "SKIP_COMPENSATION", "SagaDriver", "sweep"]

logger = logging.getLogger("accord.saga")
_locks: dict[str, asyncio.Lock] = {}


def _path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{SAGA.plural}/{name}"


# Ours, not kopf's (kopf removes its own finalizer from any object it has no handler for).
FINALIZER = f"{GROUP}/saga-compensation"
EXPIRES = f"{GROUP}/expires-at"  # label on a finished saga with a TTL: when it goes (epoch s)


class SagaDriver:
    """Runs each saga on the shared driver, one at a time per saga. The saga carries our
    finalizer from before its first call until it is finished (or released on deletion)."""

    kind = SAGA.kind

    def __init__(self, api: KubeApi, participants: Participants) -> None:
        self.api = api
        self.participants = participants
        self.last: dict[str, dict[str, Any]] = {}  # the object as a drive left it, by uid

    async def drive(
        self,
        namespace: str,
        name: str,
        *,
        deleting: bool = False,
        wait: Callable[[float], Awaitable[bool]] | None = None,
        annotations: Callable[[], Mapping[str, str]] | None = None,
        seen: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run the saga until it is terminal (returns its status) or `wait` says stop.

        `wait(seconds)` sleeps and returns True when the caller wants us to stop
        (kopf's daemon flag); without it the drive runs to a terminal phase.
        `annotations()` reads them from kopf's live view of the object (no API call).
        `seen`: the object as the watch delivered it, to start from (no read).
        """
        store = KubeStore(self.api, _path(namespace, name), annotations)
        saga = seen if seen is not None else await store.read()
        lock = _locks.setdefault(saga["metadata"]["uid"], asyncio.Lock())
        async with lock:
            if needs_controller(saga.get("status")) and not deleting:
                await self.hold(saga)  # before any call: a deletion must compensate first
            loop: Driver[Call, Outcome] = Driver(
                SagaMachine(deleting=deleting),
                store,
                self._act,
                KubeWorld(SAGA.kind, "saga", logger, COUNTERS, wait),
            )
            await loop.start(saga)
            # A Failed saga is watched for a redrive; any other terminal one is done.
            watch = wait is not None and not deleting
            status = await loop.run(watch_finished=lambda st: watch and st.get("phase") == "Failed")
            if loop.obj is not None:  # for release: no re-read
                self.last[saga["metadata"]["uid"]] = {**loop.obj, "status": status}
            return status

    async def hold(self, saga: dict[str, Any]) -> None:
        """Put our finalizer on the saga, if it is not there yet."""
        meta = saga["metadata"]
        await hold_finalizer(self.api, _path(meta["namespace"], meta["name"]), meta, FINALIZER)

    async def release(self, namespace: str, name: str, uid: str) -> None:
        await release(self.api, namespace, name, uid, self.last.pop(uid, None))

    def done(self, status: Mapping[str, Any]) -> bool:
        return not needs_controller(status)

    def let_go(self, annotations: Mapping[str, str]) -> bool:
        return skip_compensation_asked(annotations)

    def deletion_blocked(self, status: Mapping[str, Any]) -> str | None:
        """A Failed saga still holds what its compensation could not undo."""
        if status.get("phase") != "Failed":
            return None
        return (
            f"deletion waits: {status.get('message', 'a compensation failed')}; redrive it, "
            "or annotate accord.dev/skip-compensation=true to delete it anyway, leaving what "
            "it holds"
        )

    async def _act(self, call: Call, saga: dict[str, Any], status: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        outcome = await perform(call, saga, status, self.api, self.participants)
        if outcome.ok:
            metrics.SAGA_STEP_SECONDS.labels(call.kind).observe(time.perf_counter() - started)
        return outcome


async def release(
    api: KubeApi, namespace: str, name: str, uid: str, known: dict[str, Any] | None = None
) -> None:
    """Drop our finalizer (the saga is finished, or its deletion was told to skip the
    compensation); a finished saga with a TTL gets the label the sweeper looks for."""
    saga = known
    if saga is None:
        try:
            saga = await api.get(_path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
    meta = saga["metadata"]
    if meta["uid"] != uid:
        return  # a new saga under the same name: not ours to touch
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/uid", "value": uid}]
    ops += finalizer_removal(meta, FINALIZER)
    due = expires_at(saga.get("spec") or {}, saga.get("status"))
    if due is not None and not meta.get("deletionTimestamp"):
        label = EXPIRES.replace("/", "~1")
        if meta.get("labels") is None:
            ops.append({"op": "add", "path": "/metadata/labels", "value": {}})
        ops.append({"op": "add", "path": f"/metadata/labels/{label}", "value": str(int(due))})
        logger.info("saga %s/%s finished; deleted after %s (its TTL)", namespace, name, int(due))
    if len(ops) == 1:
        return
    try:
        await api.request(
            "PATCH", _path(namespace, name), ops, content_type="application/json-patch+json"
        )
    except ApiError as exc:
        if exc.status not in (404, 409, 422):  # gone, or changed meanwhile: look again
            raise
        if exc.status != 404:
            await release(api, namespace, name, uid)


COUNTERS: dict[str, Callable[..., None]] = {
    RETRY: lambda kind: metrics.SAGA_RETRIES.labels(kind).inc(),
    COMPENSATED: lambda: metrics.SAGA_COMPENSATIONS.inc(),
    FINISHED_AS: lambda phase: metrics.SAGAS.labels(phase).inc(),
    PHASE: lambda phase: metrics.PHASE_TRANSITIONS.labels(SAGA.kind, phase).inc(),
}


async def sweep(api: KubeApi, namespaces: tuple[str, ...], every: float = 10.0) -> None:
    """Finished sagas, which the watch no longer shows: delete those whose
    ttlSecondsAfterFinished has passed (labelled accord.dev/expires-at when they finished),
    and, once at start, release finished sagas that an older operator left holding our
    finalizer (deleting them would otherwise wait forever). Never stops on an error."""
    adopted = False
    while True:
        try:
            if not adopted:
                await _adopt(api, namespaces)
                adopted = True
            await _expire(api, namespaces)
        except Exception:
            logger.exception("sweeping finished sagas failed; again in %gs", every)
        await asyncio.sleep(every)


async def _adopt(api: KubeApi, namespaces: tuple[str, ...]) -> None:
    for phase in ("Succeeded", "Compensated"):
        async for saga in _pages(api, namespaces, f"fieldSelector=status.phase%3D{phase}"):
            meta = saga["metadata"]
            if FINALIZER in (meta.get("finalizers") or []) or (
                expires_at(saga.get("spec") or {}, saga.get("status")) is not None
                and EXPIRES not in (meta.get("labels") or {})
            ):
                await release(api, meta["namespace"], meta["name"], meta["uid"], saga)


async def _expire(api: KubeApi, namespaces: tuple[str, ...]) -> None:
    now = time.time()
    async for saga in _pages(api, namespaces, f"labelSelector={EXPIRES}"):
        meta = saga["metadata"]
        try:
            due = float((meta.get("labels") or {}).get(EXPIRES, "inf"))
        except ValueError:
            continue
        if due > now:
            continue
        try:
            # Only that saga: not a new one created since under the same name.
            await api.request(
                "DELETE",
                _path(meta["namespace"], meta["name"]),
                {"preconditions": {"uid": meta["uid"]}, "propagationPolicy": "Background"},
            )
            logger.info(
                "saga %s/%s deleted: ttlSecondsAfterFinished passed",
                meta["namespace"], meta["name"],
            )  # fmt: skip
        except ApiError as exc:
            if exc.status not in (404, 409):
                logger.warning("deleting expired saga %s: %s", meta["name"], exc)


async def _pages(
    api: KubeApi, namespaces: tuple[str, ...], query: str
) -> AsyncIterator[dict[str, Any]]:
    """Sagas matching `query`, a page at a time (a big cluster is never listed at once)."""
    scopes = [f"/namespaces/{ns}" for ns in namespaces] or [""]
    for scope in scopes:
        token = ""
        while True:
            url = f"/apis/{GROUP}/{VERSION}{scope}/{SAGA.plural}?{query}&limit=500"
            page = await api.get(url + (f"&continue={token}" if token else ""))
            for item in page.get("items") or []:
                yield item
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                break


def skip_compensation_asked(annotations: Mapping[str, str]) -> bool:
    return annotations.get(SKIP_COMPENSATION, "").lower() in ("true", "1", "yes")
