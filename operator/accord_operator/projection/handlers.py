"""The kopf shell for PROJECTION: decorators that call into the domain functions."""

from __future__ import annotations

from typing import Any

import kopf

from accord_operator.accept import accept
from accord_operator.resources import GROUP, PROJECTION, VERSION


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.create(GROUP, VERSION, PROJECTION.plural, id="proj-accept", registry=registry)
    @kopf.on.update(
        GROUP, VERSION, PROJECTION.plural, field="spec", id="proj-observe", registry=registry
    )
    async def proj_accept(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        accept(PROJECTION, body, patch)
