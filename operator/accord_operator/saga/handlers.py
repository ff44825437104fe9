"""The kopf shell for SagaWorkflow: the watch starts one task per unfinished saga, which
drives it (and compensates it when it is deleted); admission refuses job steps to whoever
could not create their pods."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.resources import GROUP, SAGA, VERSION
from accord_operator.saga import admission
from accord_operator.saga.runner import sweep
from accord_operator.supervisor import Supervisor


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


def register(registry: kopf.OperatorRegistry) -> None:
    # The watch shows only sagas the operator still drives (the field selector set in
    # runtime.configure): its events start a task per saga and tell it what changed (see
    # supervisor.Supervisor). A plain event handler, not kopf's daemons (kopf would keep every
    # object's body in memory) nor @index (kopf holds every worker until the whole listing
    # is indexed, and wakes them all per object: quadratic at start).
    running: list[Supervisor] = []

    @kopf.on.startup(registry=registry)
    async def saga_start(memo: kopf.Memo, **_: Any) -> None:
        supervisor = Supervisor(memo.sagas)
        running.append(supervisor)
        metrics.SAGAS_BY_PHASE.source = supervisor.phases
        memo.saga_sweeper = asyncio.create_task(sweep(memo.api, memo.namespaces))

    @kopf.on.event(GROUP, VERSION, SAGA.plural, id="saga-watch", registry=registry)
    async def saga_watch(event: kopf.RawEvent, **_: Any) -> None:  # async: on the loop
        running[0].see(event)

    @kopf.on.cleanup(registry=registry)
    async def saga_stop(memo: kopf.Memo, **_: Any) -> None:
        if memo.get("saga_sweeper") is not None:
            memo.saga_sweeper.cancel()
        if running:
            await running.pop().stop()
