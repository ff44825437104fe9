"""The kopf shell for TwoPhaseTransaction: the watch starts one coordinator task per
unfinished transaction (supervisor.Supervisor over twophase.runner.TpcDriver); admission
bounds the payloads and puts the coordinator's finalizer on."""

from __future__ import annotations

from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.resources import GROUP, TWO_PHASE, VERSION
from accord_operator.supervisor import Supervisor
from accord_operator.twophase import admission


def register_webhooks(registry: kopf.OperatorRegistry) -> None:
    # CREATE only: the spec is immutable (the CRD's rule), so no update can change a payload.
    @kopf.on.mutate(
        GROUP, VERSION, TWO_PHASE.plural, id="tpc-admission", operations=["CREATE"],
        registry=registry,
    )  # fmt: skip
    async def tpc_admission(spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        errors = admission.payload_errors(spec)
        if errors:
            raise kopf.AdmissionError("; ".join(errors), code=422)
        finalizers = admission.finalizers_at_creation(meta.get("finalizers"))
        if finalizers is not None:
            patch.metadata["finalizers"] = finalizers


def register(registry: kopf.OperatorRegistry) -> None:
    # As for sagas: the watch shows only unfinished transactions (runtime.configure), and
    # its events start and wake one coordinator task per transaction.
    running: list[Supervisor] = []

    @kopf.on.startup(registry=registry)
    async def tpc_start(memo: kopf.Memo, **_: Any) -> None:
        supervisor = Supervisor(memo.transactions)
        running.append(supervisor)
        metrics.TRANSACTIONS_BY_PHASE.source = supervisor.phases
        metrics.TRANSACTIONS_IN_DOUBT.source = supervisor.in_doubt

    @kopf.on.event(GROUP, VERSION, TWO_PHASE.plural, id="tpc-watch", registry=registry)
    async def tpc_watch(event: kopf.RawEvent, **_: Any) -> None:
        running[0].see(event)

    @kopf.on.cleanup(registry=registry)
    async def tpc_stop(**_: Any) -> None:
        if running:
            await running.pop().stop()
