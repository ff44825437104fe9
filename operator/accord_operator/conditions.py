"""Standard status.conditions (metav1.Condition) as plain data: pure functions, no I/O."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(TypedDict):
    type: str
    status: ConditionStatus
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: NotRequired[int]


def set_condition(
    conditions: list[Condition],
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[Condition]:
    """Return conditions with `type` set; lastTransitionTime moves only when status changes."""
    previous = next((c for c in conditions if c["type"] == type), None)
    updated: Condition = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": (
            now
            if previous is None or previous["status"] != status
            else previous["lastTransitionTime"]
        ),
        "observedGeneration": generation,
    }
    rest = [c for c in conditions if c["type"] != type]
    return (
        [*rest, updated]
        if previous is None
        else [updated if c["type"] == type else c for c in conditions]
    )


def find(conditions: list[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c["type"] == type), None)
