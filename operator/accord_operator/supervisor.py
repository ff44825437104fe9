"""The supervisor every kind that drives objects shares: one task per unfinished object,
from the watch events kopf already receives (see Supervisor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import kopf

from accord_operator.kubeapi import ApiError
from accord_operator.resources import GROUP, VERSION

logger = logging.getLogger("accord.supervisor")

DELETE_RETRY_S = 15.0  # a deletion that waits looks again this often
FINISHED_KEPT = 10_000  # finished objects remembered, so their late events start nothing


class Drivable(Protocol):
    """What a kind's driver gives the supervisor."""

    kind: str

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
        """Drive it; `seen`: the object as the watch delivered it, to start from without a
        read (it may be older than the object: the first write then reads it again)."""
        ...

    async def release(self, namespace: str, name: str, uid: str) -> None: ...

    def done(self, status: Mapping[str, Any]) -> bool:
        """Nothing more to do for it: release it."""
        ...

    def let_go(self, annotations: Mapping[str, str]) -> bool:
        """Its deletion was told not to wait (a saga: skip-compensation)."""
        ...

    def deletion_blocked(self, status: Mapping[str, Any]) -> str | None:
        """Why its deletion waits, when it does (said in a Warning Event)."""
        ...


def in_doubt(status: Mapping[str, Any]) -> int:
    """Participants of a transaction in doubt (0 for other kinds)."""
    return sum(
        bool(p.get("inDoubt")) for p in status.get("participants") or [] if isinstance(p, dict)
    )


class Supervisor:
    """One task per object the operator still drives, started and stopped from the watch
    events kopf already receives. The watch shows only unfinished objects (a field selector
    on status.phase), so a finished one costs nothing: no task, no memory, no event. (Not
    kopf daemons: for a resource with daemons kopf keeps every object's body in memory.)

    An object being deleted is driven with `deleting` (a saga compensates, a transaction
    finishes phase 2), then released (its finalizer dropped); one whose deletion is blocked
    (the driver says why: a saga whose compensation failed) waits, and is looked at again
    when it changes, until the driver lets it go."""

    def __init__(self, driver: Drivable) -> None:
        self.driver = driver
        self.tasks: dict[str, asyncio.Task[None]] = {}  # by uid
        self.objects: dict[str, dict[str, Any]] = {}  # the latest metadata seen, by uid
        self.changed: dict[str, asyncio.Event] = {}  # set on each event: look again
        self.first: dict[str, dict[str, Any]] = {}  # the object that started its task
        # Objects driven to the end and released, most recent last (bounded): the watch may
        # still deliver their older versions (a busy queue); those start nothing.
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.stopping = False

    def phases(self) -> dict[str, int]:
        """Objects the operator drives, by phase (a gauge)."""
        return dict(Counter(str(m.get("phase")) for m in self.objects.values()))

    def in_doubt(self) -> int:
        """Participants in doubt across the objects driven (transactions)."""
        return sum(int(m.get("inDoubt", 0)) for m in self.objects.values())

    def see(self, event: Mapping[str, Any]) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        if not uid:
            return
        if event.get("type") == "DELETED":  # deleted, or finished (out of the selector)
            self.objects.pop(uid, None)
            if uid in self.changed:
                self.changed[uid].set()
            return
        if uid in self.finished:
            return
        status = obj.get("status") or {}
        self.objects[uid] = {
            "annotations": dict(meta.get("annotations") or {}),
            "deleting": bool(meta.get("deletionTimestamp")),
            "phase": status.get("phase") or "Pending",
            "inDoubt": in_doubt(status),
        }
        if uid in self.changed:
            self.changed[uid].set()
        elif not self.stopping:
            self.changed[uid] = asyncio.Event()
            self.first[uid] = dict(obj)
            ns, name = str(meta["namespace"]), str(meta["name"])
            self.tasks[uid] = asyncio.create_task(self._run(ns, name, uid))

    async def _run(self, namespace: str, name: str, uid: str) -> None:
        changed = self.changed[uid]
        seen = self.objects.get(uid, {"deleting": False, "annotations": {}})  # gone already?
        deleting = False

        async def wait(seconds: float) -> bool:
            """Sleep; stop when the object left the watch, began its deletion, or the
            operator stops."""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), seconds)
            changed.clear()
            return self._over(uid) or self.objects[uid]["deleting"] != deleting

        try:
            while not self._over(uid):
                changed.clear()
                seen = self.objects[uid]
                deleting = seen["deleting"]
                kind = self.driver.kind
                try:
                    if deleting and self.driver.let_go(seen["annotations"]):
                        logger.info("%s %s/%s deleted as asked", kind, namespace, name)
                        await self.driver.release(namespace, name, uid)
                        return
                    # The first drive starts from the event that started the task (just
                    # created, or listed: no read); any later one reads the object.
                    status = await self.driver.drive(
                        namespace, name, deleting=deleting, wait=wait,
                        annotations=lambda last=seen: self.objects.get(uid, last)["annotations"],
                        seen=self.first.pop(uid, None),
                    )  # fmt: skip
                    let_go = deleting and self.driver.let_go(
                        self.objects.get(uid, seen)["annotations"]
                    )
                    if self.driver.done(status) or let_go:
                        await self.driver.release(namespace, name, uid)
                        self._finished(uid)
                        return
                    blocked = self.driver.deletion_blocked(status) if deleting else None
                    if blocked:
                        kopf.warn(
                            {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
                             "metadata": {"namespace": namespace, "name": name, "uid": uid}},
                            reason="DeletionWaits", message=blocked,
                        )  # fmt: skip
                        logger.warning("%s %s/%s: %s", kind, namespace, name, blocked)
                        await wait(DELETE_RETRY_S)  # a change wakes it at once
                except kopf.PermanentError:
                    return  # the object is gone
                except ApiError as exc:
                    if exc.status == 404:
                        return
                    logger.warning("%s %s/%s: %s; again in 2 s", kind, namespace, name, exc)
                    await wait(2.0)
                except Exception:
                    logger.exception(
                        "%s %s/%s: driving failed; again in 2 s", kind, namespace, name
                    )
                    await wait(2.0)  # an API hiccup must not park an object for long
        finally:
            self.tasks.pop(uid, None)
            self.changed.pop(uid, None)
            self.first.pop(uid, None)

    def _finished(self, uid: str) -> None:
        self.objects.pop(uid, None)
        self.finished[uid] = None
        if len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def _over(self, uid: str) -> bool:
        return self.stopping or uid not in self.objects

    async def stop(self, grace: float = 30.0) -> None:
        """Let every object finish its round (store, then tell), then stop."""
        self.stopping = True
        for event in self.changed.values():
            event.set()
        tasks = list(self.tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
