"""Status patches shared by the three kinds, as pure functions over plain data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from accord_operator.conditions import Condition, set_condition


def accepted_status(
    status: Mapping[str, Any], generation: int, now: str, *, kind: str, total: int | None = None
) -> dict[str, Any]:
    """The status patch for a resource the operator has seen but not started working on.

    A resource that already has a phase keeps it (a restart must not rewind progress); only
    observedGeneration and the Ready condition are brought up to date.
    """
    conditions: list[Condition] = list(status.get("conditions") or [])
    patch: dict[str, Any] = {"observedGeneration": generation}
    if not status.get("phase"):
        patch["phase"] = "Pending"
        if total is not None:
            patch["progress"] = f"0/{total}"
        # kstatus: Ready from the first reconcile; Reconciling while work is to do.
        for type_, value in (("Ready", "False"), ("Reconciling", "True"), ("Stalled", "False")):
            conditions = set_condition(
                conditions,
                type=type_,
                status=value,  # type: ignore[arg-type]
                reason="Pending",
                message=f"{kind} accepted; waiting to start",
                generation=generation,
                now=now,
            )
    else:
        conditions = [{**c, "observedGeneration": generation} for c in conditions]
    patch["conditions"] = conditions
    return patch
