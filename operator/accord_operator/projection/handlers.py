"""The kopf shell for PROJECTION: decorators that call into the domain functions."""

from __future__ import annotations

from typing import Any

import kopf

from accord_operator.accept import accept
from accord_operator.resources import GROUP, PROJECTION, VERSION


@kopf.on.create(GROUP, VERSION, PROJECTION.plural, id="proj-accept")
@kopf.on.update(GROUP, VERSION, PROJECTION.plural, field="spec", id="proj-observe")
async def proj_accept(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    accept(PROJECTION, body, patch)
