"""The kopf shell for SAGA: decorators that call into the domain functions."""

from __future__ import annotations

from typing import Any

import kopf

from accord_operator.accept import accept
from accord_operator.resources import GROUP, SAGA, VERSION


@kopf.on.create(GROUP, VERSION, SAGA.plural, id="saga-accept")
@kopf.on.update(GROUP, VERSION, SAGA.plural, field="spec", id="saga-observe")
async def saga_accept(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    accept(SAGA, body, patch)
