"""What a machine says (pure): the next status, the calls to make, when something is due, and
what happened (Events, metric increments). Shared by every machine and the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Status = dict[str, Any]
Event = tuple[str, str, str]  # (type, reason, message)
Count = tuple[str, tuple[str | float, ...]]  # (what happened, its labels or value): a metric

C = TypeVar("C")  # a call


@dataclass
class Decision(Generic[C]):
    status: Status
    calls: list[C] = field(default_factory=list)
    wake_at: float | None = None  # when something is due, if nothing is called now
    events: list[Event] = field(default_factory=list)
    counts: list[Count] = field(default_factory=list)
    # False: nothing here must be stored before the calls (none start, no decision taken);
    # the driver leaves it for the next write. (2PC votes and acknowledgements: a restart
    # presumes abort or sends phase 2 again, so they need not be stored one by one.)
    write: bool = True
