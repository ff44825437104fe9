"""One pass over a CQRSProjection (the shell around projection.plan): make its objects as
planned, read its projectors' readiness and the broker's figures, and say what the status
should be. Rebuilds are blue/green: the generation asked for (spec.rebuildGeneration) runs
beside the one that serves until it has caught up; then the query Service switches to it
and the old generation's Deployment goes."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from accord_operator.kubeapi import ApiError, KubeApi
from accord_operator.projection import plan
from accord_operator.projection.broker import BrokerUnavailable, BrokerView

logger = logging.getLogger("accord.projection")
BROKER_TIMEOUT_S = 10.0  # one pass never waits longer on the broker
_tidied: set[tuple[str, int]] = set()  # (projection uid, generation) whose old ones are gone


def _deployments(namespace: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments"


def _services(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/services"


async def _get(api: KubeApi, path: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = await api.get(path)
        return obj
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def ensure(api: KubeApi, collection: str, wanted: dict[str, Any]) -> dict[str, Any]:
    """Make `wanted`, or bring the made one to it when it was made from another spec (a
    merge patch of what we own: the API server keeps what others set, like a clusterIP)."""
    name = wanted["metadata"]["name"]
    made = await _get(api, f"{collection}/{name}")
    if made is None:
        try:
            created: dict[str, Any] = await api.request("POST", collection, wanted)
            return created
        except ApiError as exc:
            if exc.status != 409:
                raise
            made = await _get(api, f"{collection}/{name}")
    if made is not None and plan.stale(made, wanted):
        patched: dict[str, Any] = await api.request(
            "PATCH", f"{collection}/{name}", wanted, content_type="application/merge-patch+json"
        )
        return patched
    assert made is not None
    return made


def _ready(deployment: Mapping[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)


async def reconcile(
    api: KubeApi, broker: BrokerView, proj: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """Make what the projection needs; the status it should show now."""
    meta, spec = proj["metadata"], proj["spec"]
    status: Mapping[str, Any] = proj.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    target = int(spec.get("rebuildGeneration", 0))
    serving = int(status.get("servingGeneration", target))
    if serving > target:  # cannot happen (rebuildGeneration only grows); serve the target
        serving = target

    # In place: the old generation stops at once (the projector keeps one read model, which
    # the new generation's sidecar has it empty before replaying), and the new one serves.
    in_place = spec.get("rebuild") == "InPlace"
    refilling = in_place and (serving != target or status.get("phase") == "Rebuilding")
    if in_place:
        serving = target
    made = await ensure(api, _deployments(namespace), plan.deployment(proj, target))
    if serving != target:
        await ensure(api, _deployments(namespace), plan.deployment(proj, serving))

    problem = None
    progress = None
    try:
        progress = await asyncio.wait_for(
            broker.progress(
                plan.app_id(name, target),
                spec["source"]["topic"],
                int(status.get("position", 0)),
                int(spec.get("partitions", 1)),
            ),
            BROKER_TIMEOUT_S,
        )
    except BrokerUnavailable as exc:
        problem = str(exc)
    except TimeoutError:
        problem = f"the broker did not answer within {BROKER_TIMEOUT_S:g} s"
    if progress is not None and progress.stream_problem:
        problem, progress = progress.stream_problem, None

    ready = _ready(made)
    new = plan.next_status(proj, target, progress, ready, now, problem)
    caught_up = new["phase"] == "Live"
    if serving != target and not caught_up:
        # Rebuilding beside the generation that serves: queries still see the old model.
        new["servingGeneration"] = serving
        new["phase"] = "Rebuilding"
        new["message"] = f"generation {target} catching up ({new.get('lag', '?')} behind); " + (
            f"generation {serving} serves queries"
        )
        new["conditions"] = plan.conditions_for(
            list(status.get("conditions") or []), "Rebuilding", "Rebuilding", new["message"],
            new["observedGeneration"], now,
        )  # fmt: skip
    elif refilling and not caught_up and not problem:
        new["phase"] = "Rebuilding"
        new["message"] = (
            f"rebuilding in place: generation {target} replays the stream into the emptied "
            f"read model ({new.get('lag', '?')} behind); queries see it refill"
        )
        new["conditions"] = plan.conditions_for(
            list(status.get("conditions") or []), "Rebuilding", "Rebuilding", new["message"],
            new["observedGeneration"], now,
        )  # fmt: skip
    await _parked_request(api, broker, proj, target, new)
    await ensure(api, _services(namespace), plan.query_service(proj, new["servingGeneration"]))
    # The old generations go once the target serves: listed once per generation and
    # process (after a restart, leftovers are found again), not on every pass.
    tidy = (meta["uid"], target)
    if new["servingGeneration"] == target and tidy not in _tidied:
        await _remove_other_generations(api, namespace, name, target)
        _tidied.add(tidy)
    return new


async def _parked_request(
    api: KubeApi, broker: BrokerView, proj: Mapping[str, Any], target: int, new: dict[str, Any]
) -> None:
    """accord.dev/parked=retry|skip on the projection: passed on to the projectors'
    sidecars (status.parkedCommand remembers which request, so each is carried out once),
    and the annotation removed once every consumer's owner has done it."""
    meta, spec = proj["metadata"], proj["spec"]
    action = (meta.get("annotations") or {}).get(plan.PARKED_ANNOTATION)
    if action not in ("retry", "skip"):
        return
    asked = (proj.get("status") or {}).get("parkedCommand") or {}
    nonce = asked.get("nonce") if asked.get("action") == action else None
    nonce = nonce or f"{action}-{uuid.uuid4().hex[:12]}"
    new["parkedCommand"] = {"action": action, "nonce": nonce}
    try:
        done = await asyncio.wait_for(
            broker.ask(plan.consumers(meta["name"], target, spec), action, nonce),
            BROKER_TIMEOUT_S,
        )
    except (BrokerUnavailable, TimeoutError) as exc:
        logger.warning("projection %s/%s: parked events: %s", meta["namespace"], meta["name"], exc)
        return
    if not done:
        return
    await api.request(
        "PATCH",
        f"/apis/{plan.GROUP}/{plan.VERSION}/namespaces/{meta['namespace']}/"
        f"{plan.PROJECTION.plural}/{meta['name']}",
        {"metadata": {"annotations": {plan.PARKED_ANNOTATION: None}}},
        content_type="application/merge-patch+json",
    )
    new.pop("parkedCommand", None)
    new["parkedDone"] = action  # for the caller's Event; not stored


async def _remove_other_generations(api: KubeApi, namespace: str, name: str, keep: int) -> None:
    selector = f"{plan.LABEL}={name},{plan.GENERATION_LABEL}!={keep}"
    listing = await api.get(f"{_deployments(namespace)}?labelSelector={selector}")
    for item in listing.get("items") or []:
        old = item["metadata"]["name"]
        logger.info("projection %s/%s: generation %s serves; removing %s", namespace, name,
                    keep, old)  # fmt: skip
        try:
            await api.request("DELETE", f"{_deployments(namespace)}/{old}")
        except ApiError as exc:
            if exc.status != 404:
                raise
