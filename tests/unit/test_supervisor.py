"""The supervisor's bookkeeping over watch events, with a driver that records what it is
asked (no API server): one task per object, the first drive from the watched object, and
nothing started again by the late events of an object already finished."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from accord_operator.supervisor import Supervisor


class RecordingDriver:
    kind = "TwoPhaseTransaction"

    def __init__(self) -> None:
        self.drives: list[tuple[str, dict[str, Any] | None]] = []
        self.released: list[str] = []

    async def drive(
        self,
        namespace: str,
        name: str,
        *,
        deleting: bool = False,
        wait: Callable[[float], Awaitable[bool]] | None = None,
        annotations: Callable[[], Mapping[str, str]] | None = None,
        seen: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        self.drives.append((name, seen))
        await asyncio.sleep(0)
        return {"phase": "Committed"}

    async def release(self, namespace: str, name: str, uid: str) -> None:
        self.released.append(uid)

    def done(self, status: Mapping[str, Any]) -> bool:
        return status.get("phase") == "Committed"

    def let_go(self, annotations: Mapping[str, str]) -> bool:
        return False

    def deletion_blocked(self, status: Mapping[str, Any]) -> str | None:
        return None


def event(kind: str, phase: str, version: str) -> dict[str, Any]:
    return {
        "type": kind,
        "object": {
            "metadata": {"namespace": "ns", "name": "t1", "uid": "u1", "resourceVersion": version},
            "status": {"phase": phase},
        },
    }


async def test_the_first_drive_starts_from_the_watched_object() -> None:
    driver = RecordingDriver()
    supervisor = Supervisor(driver)
    supervisor.see(event("ADDED", "", "1"))
    await asyncio.gather(*supervisor.tasks.values())
    assert [
        (name, seen["metadata"]["resourceVersion"]) for name, seen in driver.drives if seen
    ] == [("t1", "1")]
    assert driver.released == ["u1"]


async def test_late_events_of_a_finished_object_start_nothing() -> None:
    """A busy watch queue delivers the versions written while the object was driven after
    its drive ended: they must not start a task that decides from a stale version (a write
    that conflicts, then a read)."""
    driver = RecordingDriver()
    supervisor = Supervisor(driver)
    supervisor.see(event("ADDED", "", "1"))
    await asyncio.gather(*supervisor.tasks.values())
    for version, phase in (("2", "Preparing"), ("3", "Committing")):
        supervisor.see(event("MODIFIED", phase, version))
    supervisor.see(event("DELETED", "Committed", "4"))  # left the watch's selector
    assert not supervisor.tasks
    assert len(driver.drives) == 1 and driver.released == ["u1"]
    assert supervisor.phases() == {}


async def test_an_object_gone_before_its_task_ran_is_not_driven() -> None:
    driver = RecordingDriver()
    supervisor = Supervisor(driver)
    supervisor.see(event("ADDED", "", "1"))
    supervisor.see(event("DELETED", "", "2"))  # before the task got to run
    await asyncio.gather(*supervisor.tasks.values())  # raises if the task failed
    assert driver.drives == [] and not supervisor.tasks
