"""The kopf shell for SagaWorkflow: one daemon per saga drives it; deletion compensates;
admission refuses job steps to whoever could not create their pods."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.resources import GROUP, SAGA, VERSION
from accord_operator.saga import admission
from accord_operator.saga.machine import expires_at, needs_controller
from accord_operator.saga.runner import skip_compensation, sweep_expired


def register_webhooks(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.validate(
        GROUP, VERSION, SAGA.plural, id="saga-job-steps", operations=["CREATE", "UPDATE"],
        registry=registry,
    )  # fmt: skip
    async def saga_job_steps(
        spec: kopf.Spec,
        old: kopf.Body | None,
        userinfo: dict[str, Any],
        namespace: str | None,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        steps = admission.job_steps(spec)
        if not steps or (old is not None and dict(old.get("spec") or {}) == dict(spec)):
            return  # nothing runs a pod, or the spec did not change (labels, annotations)
        review = admission.pod_access_review(userinfo, namespace or "")
        answer = await memo.api.request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review
        )
        if not (answer.get("status") or {}).get("allowed"):
            raise kopf.AdmissionError(admission.refusal(steps, userinfo, namespace or ""), code=403)


DELETE_RETRY_S = 15  # a saga whose compensation failed: how often its deletion looks again


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return needs_controller(status)


def _expiring(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    return expires_at(spec, status) is not None


def register(registry: kopf.OperatorRegistry) -> None:
    # Finished sagas with a TTL, and when each is due: an index fed by the watch, swept by
    # one task (a finished saga keeps no task of its own).
    @kopf.index(GROUP, VERSION, SAGA.plural, id="saga_expiry", when=_expiring, registry=registry)
    def saga_expiry(
        spec: kopf.Spec, status: kopf.Status, namespace: str, name: str, uid: str, **_: Any
    ) -> dict[tuple[str, str], tuple[str, float]]:
        return {(namespace, name): (uid, expires_at(spec, status) or 0.0)}

    # Every saga by phase: the accord_sagas gauge, counted from the watch on each scrape.
    @kopf.index(GROUP, VERSION, SAGA.plural, id="saga_phases", registry=registry)
    def saga_phases(status: kopf.Status, **_: Any) -> dict[str, None]:
        return {str(status.get("phase") or "Pending"): None}

    @kopf.on.startup(registry=registry)
    def saga_phase_gauge(saga_phases: kopf.Index[Any, Any], **_: Any) -> None:
        metrics.SAGAS_BY_PHASE.source = lambda: {p: len(s) for p, s in saga_phases.items()}

    @kopf.on.startup(registry=registry)
    async def saga_sweeper_start(
        saga_expiry: kopf.Index[Any, Any], memo: kopf.Memo, **_: Any
    ) -> None:
        memo.saga_sweeper = asyncio.create_task(sweep_expired(saga_expiry, memo.api))

    @kopf.on.cleanup(registry=registry)
    async def saga_sweeper_stop(memo: kopf.Memo, **_: Any) -> None:
        if memo.get("saga_sweeper") is not None:
            memo.saga_sweeper.cancel()

    @kopf.daemon(
        GROUP,
        VERSION,
        SAGA.plural,
        id="saga-run",
        registry=registry,
        # Stopped (the saga finished, or the operator exits): let it finish its round (store,
        # then tell) and leave at its next wait, instead of cancelling it mid-write.
        cancellation_backoff=30,
        cancellation_timeout=30,
        backoff=2,  # an API hiccup must not park a saga for kopf's default minute
        initial_delay=0,
        # A finished saga has no daemon, and so (with the delete handler's filter) no
        # finalizer: kopf removes it, and deleting the saga or its namespace never waits.
        when=_unfinished,
    )
    async def saga_run(
        body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any
    ) -> None:
        async def wait(seconds: float) -> bool:
            await stopped.wait(seconds)
            return bool(stopped)

        await memo.sagas.drive(
            body.metadata.namespace,
            body.metadata.name,
            wait=wait,
            annotations=lambda: body.metadata.annotations,
        )

    @kopf.on.delete(
        GROUP, VERSION, SAGA.plural, id="saga-compensate-on-delete", registry=registry,
        when=_unfinished,
    )  # fmt: skip
    async def saga_delete(
        body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
    ) -> None:
        if skip_compensation(body):
            logger.info("deleted with accord.dev/skip-compensation: not compensating")
            return
        status = await memo.sagas.drive(body.metadata.namespace, body.metadata.name, deleting=True)
        if status.get("phase") == "Failed":
            # A compensation failed for good: something is still held. Deleting the saga now
            # would leave it held with nothing to redrive, so the finalizer stays.
            why = (
                f"deletion waits: {status.get('message', 'a compensation failed')}; or "
                "annotate accord.dev/skip-compensation=true to delete it anyway, leaving what "
                "it holds"
            )
            kopf.warn(body, reason="DeletionWaits", message=why)
            raise kopf.TemporaryError(why, delay=DELETE_RETRY_S)
        logger.info("saga deleted after reaching %s", status.get("phase"))
