"""TwoPhaseTransaction on the shared driver (accord_operator.driver): the coordinator's
calls to participants, its world (real time, Events, metrics) and its finalizer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import accord_wire as wire
from accord_operator import metrics
from accord_operator.driver import Driver
from accord_operator.kubeapi import KubeApi
from accord_operator.participants import Participants, ServiceNotFound
from accord_operator.resources import GROUP, TWO_PHASE, VERSION
from accord_operator.store import KubeStore, drop_finalizer, hold_finalizer
from accord_operator.twophase.admission import FINALIZER
from accord_operator.twophase.machine import (
    DECIDED,
    FINISHED_AS,
    IN_DOUBT,
    PHASE,
    PHASE_SECONDS,
    TERMINAL,
    Call,
    Outcome,
    TpcMachine,
)
from accord_operator.world import KubeWorld

logger = logging.getLogger("accord.tpc")
_locks: dict[str, asyncio.Lock] = {}


def path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{TWO_PHASE.plural}/{name}"


class TpcDriver:
    """Runs each transaction on the shared driver, one coordinator per transaction in this
    process (another process racing on it loses at the write, and reads the decision)."""

    kind = TWO_PHASE.kind

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
        store = KubeStore(self.api, path(namespace, name), annotations)
        tx = seen if seen is not None else await store.read()
        lock = _locks.setdefault(tx["metadata"]["uid"], asyncio.Lock())
        async with lock:
            if (tx.get("status") or {}).get("phase") not in TERMINAL and not deleting:
                await hold_finalizer(self.api, path(namespace, name), tx["metadata"], FINALIZER)
            loop: Driver[Call, Outcome] = Driver(
                TpcMachine(deleting=deleting),
                store,
                self._act,
                KubeWorld(TWO_PHASE.kind, "transaction", logger, COUNTERS, wait),
            )
            await loop.start(tx)
            status = await loop.run(watch_finished=False)
            if loop.obj is not None:  # for release: no re-read
                self.last[tx["metadata"]["uid"]] = loop.obj
            return status

    async def release(self, namespace: str, name: str, uid: str) -> None:
        known = self.last.pop(uid, None)
        await drop_finalizer(self.api, path(namespace, name), uid, FINALIZER, known)
        _locks.pop(uid, None)

    def done(self, status: Mapping[str, Any]) -> bool:
        return status.get("phase") in TERMINAL

    def let_go(self, annotations: Mapping[str, str]) -> bool:
        return False  # phase 2 always finishes: a decision is never left half-delivered

    def deletion_blocked(self, status: Mapping[str, Any]) -> str | None:
        return None

    async def _act(self, call: Call, tx: dict[str, Any], status: dict[str, Any]) -> Outcome:
        return await perform(call, tx, self.participants)


async def perform(call: Call, tx: Mapping[str, Any], participants: Participants) -> Outcome:
    """One 2PC call: POST <pathPrefix>/<kind> {"txid", "payload"?}. A prepare answer that is
    not a 2xx {"vote": "commit" | "abort"} is an abort vote; a commit or abort is
    acknowledged by any 2xx."""
    meta = tx["metadata"]
    p = next(x for x in tx["spec"]["participants"] if x["name"] == call.participant)
    body: dict[str, Any] = {"txid": meta["uid"]}
    if call.kind == "prepare":
        body["payload"] = p.get("payload", {})
    try:
        base = await participants.base_url(
            meta["namespace"], p["service"], int(p.get("port", 3501))
        )
    except ServiceNotFound as exc:
        return Outcome(call.participant, call.kind, retryable=True, error=str(exc), reached=False)
    answer = await participants.call(
        f"{base}{p.get('pathPrefix', '')}/{call.kind}",
        body,
        {
            wire.TRANSACTION: meta["uid"],
            wire.TRANSACTION_REF: f"{meta['namespace']}/{meta['name']}",
            wire.TPC_PHASE: call.kind,
        },
        call.timeout_s,
    )
    if call.kind != "prepare":
        return Outcome(call.participant, call.kind, ok=answer.ok, retryable=not answer.ok,
                       error=answer.error)  # fmt: skip
    if answer.ok:
        vote = answer.body.get("vote") if isinstance(answer.body, dict) else None
        if isinstance(vote, str) and vote.lower() in ("commit", "abort"):
            return Outcome(call.participant, "prepare", vote=vote.capitalize())
        return Outcome(call.participant, "prepare", error=f"an answer that is not a vote: "
                       f"{str(answer.body)[:200]}")  # fmt: skip
    reached = answer.unknown or answer.status != 0  # it answered, or the request may have got there
    return Outcome(call.participant, "prepare", retryable=answer.retryable, error=answer.error,
                   reached=reached)  # fmt: skip


COUNTERS: dict[str, Callable[..., None]] = {
    FINISHED_AS: lambda outcome: metrics.TRANSACTIONS.labels(outcome).inc(),
    DECIDED: lambda d: metrics.TRANSACTION_DECISIONS.labels(d).inc(),
    PHASE: lambda phase: metrics.PHASE_TRANSITIONS.labels(TWO_PHASE.kind, phase).inc(),
    IN_DOUBT: lambda: metrics.TRANSACTIONS_IN_DOUBT_TOTAL.inc(),
    PHASE_SECONDS: lambda phase, s: metrics.TRANSACTION_PHASE_SECONDS.labels(phase).observe(s),
}
