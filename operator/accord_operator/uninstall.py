"""accord-operator uninstall: what the chart's pre-delete hook runs before Helm removes the
controller.

Helm keeps CRDs but removes the controller; any Accord resource left behind would keep its
finalizer forever, and so would its namespace's deletion. So the hook deletes every Accord
resource while the controller still runs (a running saga compensates, as on any delete),
waits for the controller to finalize them, and only after the timeout removes the finalizer
of what is left, naming each one and its phase, so a human knows what may still be held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from accord_operator.kubeapi import ApiError, KubeApi
from accord_operator.resources import API_VERSION, GROUP, KINDS, Kind
from accord_operator.twophase.admission import FINALIZER as TPC_FINALIZER

logger = logging.getLogger("accord.uninstall")
# kopf's (older operators put it on sagas) and the saga driver's own.
FINALIZERS = (f"{GROUP}/finalizer", f"{GROUP}/saga-compensation", TPC_FINALIZER)
_POLL_S = 1.0


@dataclass(frozen=True)
class Leftover:
    kind: Kind
    namespace: str
    name: str
    phase: str


def _collection(kind: Kind, namespace: str | None) -> str:
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"/apis/{API_VERSION}{scope}/{kind.plural}"


async def _list(api: KubeApi, namespaces: tuple[str, ...]) -> list[tuple[Kind, dict[str, Any]]]:
    found = []
    for kind in KINDS:
        for ns in namespaces or (None,):
            try:
                items = (await api.get(_collection(kind, ns)))["items"]
            except ApiError as exc:
                if exc.status == 404:  # CRD not installed: nothing of that kind
                    continue
                raise
            found += [(kind, item) for item in items]
    return found


async def uninstall(api: KubeApi, namespaces: tuple[str, ...], timeout_s: float) -> list[Leftover]:
    """Delete every Accord resource and wait; returns those whose finalizer had to go."""
    objects = await _list(api, namespaces)
    for kind, obj in objects:
        meta = obj["metadata"]
        logger.info("deleting %s %s/%s", kind.kind, meta["namespace"], meta["name"])
        try:
            await api.request("DELETE", f"{_collection(kind, meta['namespace'])}/{meta['name']}")
        except ApiError as exc:
            if exc.status != 404:
                raise
    deadline = time.monotonic() + timeout_s
    while objects and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)
        objects = await _list(api, namespaces)
    leftovers = []
    for kind, obj in objects:
        meta = obj["metadata"]
        phase = (obj.get("status") or {}).get("phase", "")
        finalizers = [f for f in meta.get("finalizers") or [] if f not in FINALIZERS]
        logger.warning(
            "%s %s/%s (phase %s) was not finalized within %gs; removing its finalizer: "
            "check by hand what it may still hold",
            kind.kind, meta["namespace"], meta["name"], phase or "unknown", timeout_s,
        )  # fmt: skip
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        try:
            await api.request(
                "PATCH",
                f"{_collection(kind, meta['namespace'])}/{meta['name']}",
                patch,
                content_type="application/merge-patch+json",
            )
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone, or finalized meanwhile
                raise
        leftovers.append(Leftover(kind, meta["namespace"], meta["name"], phase))
    return leftovers
