"""Pods that asked for the sidecar but run without it (webhook down with failurePolicy
Ignore) get a Warning Event and count in accord_injection_misses_total."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

from accord_operator.injector.config import NAMESPACE_LABEL, AnnotationError
from accord_operator.injector.patch import Injector, decide
from accord_operator.kubeapi import ApiError, KubeApi
from accord_operator.metrics import INJECTION_MISSES

_NS_TTL = 30.0
_ns_cache: dict[str, tuple[float, bool]] = {}


async def _namespace_enabled(api: KubeApi, namespace: str) -> bool:
    cached = _ns_cache.get(namespace)
    if cached and time.monotonic() - cached[0] < _NS_TTL:
        return cached[1]
    labels = (await api.get(f"/api/v1/namespaces/{namespace}"))["metadata"].get("labels") or {}
    enabled = labels.get(NAMESPACE_LABEL) == "enabled"
    _ns_cache[namespace] = (time.monotonic(), enabled)
    return enabled


async def _report(api: KubeApi, pod: Mapping[str, Any], reason: str) -> bool:
    """Post the Warning Event once per pod (its name is derived from the pod's uid)."""
    meta = pod["metadata"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.accord-sidecar-missing.{meta['uid'][:8]}"},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": "Warning",
        "reason": "SidecarMissing",
        "message": (
            f"pod asked for the Accord sidecar ({reason}) but was created without it; "
            "the injection webhook was probably unreachable. Recreate the pod to inject it."
        ),
        "source": {"component": "accord-operator"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
    except ApiError as exc:
        if exc.status == 409:
            return False  # reported before (e.g. by a previous operator process)
        raise
    return True


async def check(
    pod: Mapping[str, Any], injector: Injector, api: KubeApi, logger: logging.Logger
) -> None:
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp") or not meta.get("uid"):
        return
    namespace = meta.get("namespace", "")
    try:
        enabled = await _namespace_enabled(api, namespace)
        decision = decide(
            pod,
            namespace=namespace,
            namespace_enabled=enabled,
            operator_namespace=injector.operator_namespace,
        )
    except (AnnotationError, ApiError):
        return
    if not decision.inject:
        return  # has the sidecar, or never asked for it
    if await _report(api, pod, decision.reason):
        INJECTION_MISSES.labels(namespace).inc()
        logger.warning(
            "pod %s/%s runs without the sidecar it asked for", namespace, meta.get("name")
        )
