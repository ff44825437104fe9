"""Accepting a resource: the first status every kind gets, shared by the three shells."""

from __future__ import annotations

import datetime
from typing import Any

import kopf

from accord_operator.metrics import PHASE_TRANSITIONS, RECONCILES
from accord_operator.resources import Kind
from accord_operator.status import accepted_status


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def accept(kind: Kind, body: kopf.Body, patch: kopf.Patch) -> None:
    """Record observedGeneration and, for a new resource, phase Pending with a Ready condition."""
    status: dict[str, Any] = dict(body.get("status") or {})
    spec = body.get("spec") or {}
    items = spec.get("steps", spec.get("participants"))
    update = accepted_status(
        status,
        int(body.metadata["generation"]),
        now(),
        kind=kind.kind,
        total=len(items) if isinstance(items, list) else None,
    )
    patch.status.update(update)
    if "phase" in update:
        PHASE_TRANSITIONS.labels(kind.kind, update["phase"]).inc()
        kopf.info(body, reason=update["phase"], message=f"{kind.kind} accepted")
    RECONCILES.labels(kind.kind, "ok").inc()
