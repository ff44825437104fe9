"""The kopf shell for TWO_PHASE: decorators that call into the domain functions."""

from __future__ import annotations

from typing import Any

import kopf

from accord_operator.accept import accept
from accord_operator.resources import GROUP, TWO_PHASE, VERSION
from accord_operator.twophase import admission


def register_webhooks(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.validate(
        GROUP, VERSION, TWO_PHASE.plural, id="tpc-payloads", operations=["CREATE", "UPDATE"],
        registry=registry,
    )  # fmt: skip
    async def tpc_payloads(spec: kopf.Spec, **_: Any) -> None:
        errors = admission.payload_errors(spec)
        if errors:
            raise kopf.AdmissionError("; ".join(errors), code=422)


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.create(GROUP, VERSION, TWO_PHASE.plural, id="tpc-accept", registry=registry)
    @kopf.on.update(
        GROUP, VERSION, TWO_PHASE.plural, field="spec", id="tpc-observe", registry=registry
    )
    async def tpc_accept(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        accept(TWO_PHASE, body, patch)
