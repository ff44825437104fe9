"""The kopf shell for CQRSProjection: one pass every SYNC_S seconds, the first at once. A
pass accepts a projection that has no phase yet; after that it runs projection.reconcile:
objects made as planned, the broker's figures read, the status written only when it says
something new (so at most once per pass: rate-limited)."""

from __future__ import annotations

import datetime
from typing import Any

import kopf

from accord_operator import metrics
from accord_operator.accept import accept
from accord_operator.kubeapi import ApiError
from accord_operator.projection import plan
from accord_operator.projection.reconcile import reconcile
from accord_operator.resources import GROUP, PROJECTION, VERSION

SYNC_S = 2.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.timer(
        GROUP, VERSION, PROJECTION.plural, id="proj-sync", interval=SYNC_S, registry=registry
    )  # fmt: skip
    async def proj_sync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        proj = {"metadata": dict(body.metadata), "spec": dict(body.spec),
                "status": dict(body.status)}  # fmt: skip
        if not proj["status"].get("phase"):
            # The first pass accepts it, and so does any pass that finds it still without a
            # phase: one path, so an acceptance lost on the way (a failed patch, a restart
            # between kopf's annotation patch and its status patch) is made again 2 s later.
            accept(PROJECTION, body, patch)
            return
        meta = proj["metadata"]
        try:
            new = await reconcile(memo.api, memo.broker, proj, _now())
        except ApiError as exc:
            metrics.RECONCILES.labels(PROJECTION.kind, "error").inc()
            raise kopf.TemporaryError(f"API: {exc}", delay=SYNC_S) from None
        old = proj["status"]
        done = new.pop("parkedDone", None)
        if done:
            kopf.info(body, reason="ParkedRetried" if done == "retry" else "ParkedSkipped",
                      message=f"parked events: {done} carried out by the projectors")  # fmt: skip
        gauges = {"lag": metrics.PROJECTION_LAG, "position": metrics.PROJECTION_POSITION,
                  "eventsProcessed": metrics.PROJECTION_EVENTS,
                  "parkedEvents": metrics.PROJECTION_PARKED,
                  "deadLettered": metrics.PROJECTION_DEAD_LETTERED}  # fmt: skip
        for key, gauge in gauges.items():
            if key in new:
                gauge.labels(meta["namespace"], meta["name"]).set(new[key])
        metrics.RECONCILES.labels(PROJECTION.kind, "ok").inc()
        if not plan.changed(old, new):
            return
        patch.status.update(new)
        for key in old.keys() - new.keys():  # a merge patch keeps what it does not name
            patch.status[key] = None
        if new["phase"] != old.get("phase"):
            metrics.PHASE_TRANSITIONS.labels(PROJECTION.kind, new["phase"]).inc()
            kind = "Warning" if new["phase"] == "Degraded" else "Normal"
            kopf.event(body, type=kind, reason=new["phase"], message=new["message"])
        if (
            new.get("servingGeneration") != old.get("servingGeneration")
            and "servingGeneration" in old
        ):
            metrics.PROJECTION_SWITCHES.inc()
            kopf.info(body, reason="Switched",
                      message=f"generation {new['servingGeneration']} serves queries")  # fmt: skip

    @kopf.on.delete(GROUP, VERSION, PROJECTION.plural, id="proj-forget", optional=True,
                    registry=registry)  # fmt: skip
    async def proj_forget(meta: kopf.Meta, **_: Any) -> None:
        metrics.forget_projection(str(meta["namespace"]), str(meta["name"]))
