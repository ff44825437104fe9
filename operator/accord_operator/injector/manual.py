"""Manual injection (`accord-operator inject -f`), like `istioctl kube-inject`: the same
decision and patch as the webhook, applied to pods and to the pod templates of workloads."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import jsonpatch

from accord_operator.injector.patch import Injector, build_patch, decide

# Where each kind keeps its pod template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def inject_object(obj: dict[str, Any], injector: Injector) -> dict[str, Any]:
    """Return obj with the sidecar in its pod (template); other kinds come back unchanged.

    Injection is explicit here, so a namespace label is not needed; a pod template that
    opts out with accord.dev/inject=false is respected.
    """
    path = TEMPLATE_PATHS.get(obj.get("kind", ""))
    if path is None:
        return obj
    out = copy.deepcopy(obj)
    pod: dict[str, Any] = out
    for key in path:
        pod = pod.setdefault(key, {})
    namespace = (obj.get("metadata") or {}).get("namespace", "default")
    decision = decide(
        pod,
        namespace=namespace,
        namespace_enabled=True,
        operator_namespace=injector.operator_namespace,
    )
    if not decision.inject:
        return out
    jsonpatch.apply_patch(pod, build_patch(pod, injector), in_place=True)
    return out


def inject_documents(docs: Iterable[Any], injector: Injector) -> list[Any]:
    result = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            doc = {**doc, "items": [inject_object(i, injector) for i in doc.get("items") or []]}
        elif isinstance(doc, dict):
            doc = inject_object(doc, injector)
        result.append(doc)
    return result
