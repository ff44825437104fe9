"""The kopf shell for SAGA: decorators that call into the domain functions."""

from __future__ import annotations

from typing import Any

import kopf

from accord_operator.accept import accept
from accord_operator.resources import GROUP, SAGA, VERSION


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.create(GROUP, VERSION, SAGA.plural, id="saga-accept", registry=registry)
    @kopf.on.update(GROUP, VERSION, SAGA.plural, field="spec", id="saga-observe", registry=registry)
    async def saga_accept(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        accept(SAGA, body, patch)
