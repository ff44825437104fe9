"""Performing one saga call: an HTTP request to a participant, or a pod run to completion."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Mapping
from typing import Any

import accord_wire as wire
from accord_operator.kubeapi import ApiError, KubeApi
from accord_operator.participants import Participants, ServiceNotFound
from accord_operator.resources import API_VERSION, SAGA
from accord_operator.saga.machine import Call, Outcome

POLL_S = 0.5


def _outputs(status: Mapping[str, Any]) -> dict[str, Any]:
    return {s["name"]: s["output"] for s in status.get("steps", []) if "output" in s}


async def perform(
    call: Call,
    saga: Mapping[str, Any],
    status: Mapping[str, Any],
    api: KubeApi,
    participants: Participants,
) -> Outcome:
    spec_step = next(s for s in saga["spec"]["steps"] if s["name"] == call.step)
    target = spec_step.get(call.kind) or {}
    try:
        if "http" in target:
            return await _http(call, target["http"], saga, status, participants)
        return await _job(call, target["job"], saga, status, api)
    except ServiceNotFound as exc:
        return Outcome(call.step, call.kind, ok=False, retryable=True, error=str(exc))
    except ApiError as exc:
        return Outcome(
            call.step, call.kind, ok=False, retryable=True, error=f"Kubernetes API: {exc}"
        )


async def _http(
    call: Call,
    http: Mapping[str, Any],
    saga: Mapping[str, Any],
    status: Mapping[str, Any],
    participants: Participants,
) -> Outcome:
    meta = saga["metadata"]
    base = await participants.base_url(
        meta["namespace"], http["service"], int(http.get("port", 3501))
    )
    answer = await participants.call(
        base + http["path"],
        {"input": saga["spec"].get("input", {}), "outputs": _outputs(status)},
        {
            wire.SAGA: f"{meta['namespace']}/{meta['name']}",
            wire.STEP: call.step,
            wire.IDEMPOTENCY_KEY: call.key,
        },
        call.timeout_s,
        method=http.get("method", "POST"),
    )
    return Outcome(
        call.step,
        call.kind,
        ok=answer.ok,
        retryable=answer.retryable,
        error=answer.error,
        output=answer.body if answer.ok else None,
        unknown=answer.unknown,
        replayed=answer.replayed,
    )


RESTRICTED_CONTAINER: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_name(saga: str, step: str, kind: str, attempt: int) -> str:
    """Deterministic per attempt, so a restarted operator finds the pod it created."""
    base = re.sub(r"[^a-z0-9-]", "-", f"{saga}-{step}-{kind[0]}{attempt}".lower())
    if len(base) <= 63:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[:54].rstrip('-')}-{digest}"


async def _job(
    call: Call,
    job: Mapping[str, Any],
    saga: Mapping[str, Any],
    status: Mapping[str, Any],
    api: KubeApi,
) -> Outcome:
    meta = saga["metadata"]
    ns = meta["namespace"]
    name = pod_name(meta["name"], call.step, call.kind, call.attempt)
    env = [
        {"name": "ACCORD_SAGA", "value": f"{ns}/{meta['name']}"},
        {"name": "ACCORD_STEP", "value": call.step},
        {"name": "ACCORD_STEP_KIND", "value": call.kind},
        {"name": "ACCORD_IDEMPOTENCY_KEY", "value": call.key},
        {"name": "ACCORD_SAGA_INPUT", "value": json.dumps(saga["spec"].get("input", {}))},
        {"name": "ACCORD_SAGA_OUTPUTS", "value": json.dumps(_outputs(status))},
        *(job.get("env") or []),
    ]
    container: dict[str, Any] = {
        "name": "step",
        "image": job["image"],
        "env": env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # PSS `restricted` by default, so namespaces that enforce it run job steps; an
        # image that must run as root says so in job.securityContext.
        "securityContext": {**RESTRICTED_CONTAINER, **(job.get("securityContext") or {})},
    }
    for key in ("command", "args"):
        if job.get(key):
            container[key] = job[key]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "accord.dev/saga": meta["name"],
                "accord.dev/step": call.step,
                "accord.dev/step-kind": call.kind,
            },
            "annotations": {wire.INJECT: "true"},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": SAGA.kind,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [container],
            "activeDeadlineSeconds": max(1, int(call.timeout_s)),
        },
    }
    if job.get("serviceAccountName"):
        pod["spec"]["serviceAccountName"] = job["serviceAccountName"]
    try:
        await api.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    except ApiError as exc:
        if exc.status != 409:  # 409: created before a restart; adopt it
            raise
    deadline = time.monotonic() + call.timeout_s
    while time.monotonic() < deadline:
        current = await api.get(f"/api/v1/namespaces/{ns}/pods/{name}")
        phase = (current.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return _job_outcome(call, current, phase)
        await asyncio.sleep(POLL_S)
    await api.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}")
    return Outcome(
        call.step,
        call.kind,
        ok=False,
        retryable=True,
        unknown=True,
        error=f"pod {name} did not finish within {call.timeout_s:g}s",
    )


def _job_outcome(call: Call, pod: Mapping[str, Any], phase: str) -> Outcome:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    step = next((s for s in statuses if s.get("name") == "step"), {})
    terminated = (step.get("state") or {}).get("terminated") or {}
    message = (terminated.get("message") or "").strip()
    if phase == "Succeeded":
        try:
            output: Any = json.loads(message) if message else None
        except ValueError:
            output = message
        return Outcome(call.step, call.kind, ok=True, output=output)
    reason = terminated.get("reason") or (pod.get("status") or {}).get("reason") or "Failed"
    code = terminated.get("exitCode")
    return Outcome(
        call.step,
        call.kind,
        ok=False,
        retryable=True,
        error=f"pod {pod['metadata']['name']} failed ({reason}, exit code {code}): {message[:500]}",
    )
