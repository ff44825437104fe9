"""A resource's status in the API server as the shared driver's Store: read, refresh, and a
status write over the version it was decided from (optimistic concurrency)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from accord_operator.kubeapi import ApiError, KubeApi

logger = logging.getLogger("accord.store")


class KubeStore:
    """A resource's status in the API server, written with optimistic concurrency."""

    def __init__(
        self, api: KubeApi, path: str, annotations: Callable[[], Mapping[str, str]] | None
    ) -> None:
        self.api, self.path, self._annotations = api, path, annotations

    async def read(self) -> dict[str, Any]:
        obj: dict[str, Any] = await self.api.get(self.path)
        return obj

    async def refresh(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self._annotations is not None:
            meta = {**obj["metadata"], "annotations": dict(self._annotations())}
        else:
            meta = (await self.read())["metadata"]
        return {**obj, "metadata": meta}

    async def write(
        self, obj: dict[str, Any], status: dict[str, Any], written: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Store status over the one we last wrote. None when stored; else the object as it
        is now, because someone else changed its status or spec (decide again from it). A
        change of metadata only (kopf's annotations and finalizer) is written over."""
        meta = obj["metadata"]
        while not await self._patch(meta, status):
            fresh = await self.read()
            if dict(fresh.get("status") or {}) != written or fresh["spec"] != obj["spec"]:
                logger.info("%s changed meanwhile: deciding again", self.path)
                return fresh
            meta.clear()
            meta.update(fresh["metadata"])
        return None

    async def _patch(self, meta: dict[str, Any], status: dict[str, Any]) -> bool:
        """Store the status over the version it was decided from; False if the object
        changed meanwhile (a stale writer never overwrites a newer decision)."""
        try:
            answer = await self.api.request(
                "PATCH",
                self.path + "/status",
                [
                    # A resourceVersion in the patch is a precondition: 409 if it moved on.
                    {"op": "replace", "path": "/metadata/resourceVersion",
                     "value": meta["resourceVersion"]},
                    {"op": "add", "path": "/status", "value": status},
                ],
                content_type="application/json-patch+json",
            )  # fmt: skip
        except ApiError as exc:
            if exc.status == 404:
                raise kopf.PermanentError(f"{self.path} is gone") from None
            if exc.status == 409:
                logger.info("%s changed meanwhile: deciding again", self.path)
                return False
            raise
        meta["resourceVersion"] = answer["metadata"]["resourceVersion"]
        return True


async def hold_finalizer(api: KubeApi, path: str, meta: dict[str, Any], finalizer: str) -> None:
    """Put `finalizer` on the object (that uid only), if it is not there yet; `meta` is
    updated with what the API server answered. `meta` may be a watch's view, older than the
    object: the patch holds only over that very version, and a stale view is read again."""
    for _ in range(5):
        if finalizer in (meta.get("finalizers") or []) or meta.get("deletionTimestamp"):
            return
        version = meta["resourceVersion"]
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "replace", "path": "/metadata/resourceVersion", "value": version},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}
            if meta.get("finalizers") is not None
            else {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ]
        try:
            answer = await api.request(
                "PATCH", path, ops, content_type="application/json-patch+json"
            )
        except ApiError as exc:
            if exc.status != 409:
                raise
            fresh = (await api.get(path))["metadata"]
            if fresh["uid"] != meta["uid"]:
                raise kopf.PermanentError(f"{path} is another object now") from None
            meta.update(fresh)
            continue
        meta["finalizers"] = answer["metadata"].get("finalizers")
        meta["resourceVersion"] = answer["metadata"]["resourceVersion"]
        return
    raise ApiError(409, f"{path} kept changing: no finalizer put on it")


def finalizer_removal(meta: dict[str, Any], finalizer: str) -> list[dict[str, Any]]:
    """JSON-patch operations that drop `finalizer` from that very object (none if absent)."""
    finalizers = meta.get("finalizers") or []
    if finalizer not in finalizers:
        return []
    i = finalizers.index(finalizer)
    return [
        {"op": "test", "path": f"/metadata/finalizers/{i}", "value": finalizer},
        {"op": "remove", "path": f"/metadata/finalizers/{i}"},
    ]


async def drop_finalizer(
    api: KubeApi, path: str, uid: str, finalizer: str, known: dict[str, Any] | None = None
) -> None:
    """Remove `finalizer` from the object with that uid; gone or changed meanwhile is fine
    (a changed object is looked at again). `known`: the object as last seen, tried first
    (no read)."""
    for _ in range(5):
        obj, known = known, None
        if obj is None:
            try:
                obj = await api.get(path)
            except ApiError as exc:
                if exc.status == 404:
                    return
                raise
        meta = obj["metadata"]
        ops = finalizer_removal(meta, finalizer)
        if meta["uid"] != uid or not ops:
            return
        try:
            await api.request(
                "PATCH", path, [{"op": "test", "path": "/metadata/uid", "value": uid}, *ops],
                content_type="application/json-patch+json",
            )  # fmt: skip
            return
        except ApiError as exc:
            if exc.status == 404:
                return
            if exc.status not in (409, 422):
                raise
