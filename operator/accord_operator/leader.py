"""One active controller: a coordination.k8s.io Lease, as client-go's leader election does.

kopf's peering is not leader election (equal priorities freeze each other), so the
controller takes this Lease before it starts its reconcilers, renews it while it runs, stops
(and exits, to be restarted as a candidate) the moment it cannot be sure it still holds it,
and releases it on shutdown so a standby takes over at once. Every status write also carries
its resourceVersion (saga/runner.py), so even a stale leader cannot overwrite a newer
decision. Webhook replicas need no leader.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

from accord_operator.kubeapi import ApiError, KubeApi

logger = logging.getLogger("accord.leader")
LEASE_NAME = "accord-controller"
LEASE_S = 15  # how long a holder that stopped renewing keeps the lease
RENEW_S = 2.0  # how often the holder renews; a standby retries as often


class LeadershipLost(Exception):
    """The lease could not be renewed in time: another controller may be active now."""


def _micro_time(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> float:
    if not value:
        return 0.0
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def can_take(spec: Mapping[str, Any], identity: str, now: float) -> bool:
    """Free (released or never held), ours, or expired: its holder stopped renewing."""
    holder = spec.get("holderIdentity") or ""
    if holder in ("", identity):
        return True
    renewed = _parse(spec.get("renewTime") or spec.get("acquireTime"))
    return renewed + float(spec.get("leaseDurationSeconds") or LEASE_S) < now


def taken_spec(spec: Mapping[str, Any], identity: str, now: float) -> dict[str, Any]:
    """The lease's spec once `identity` holds it at `now` (renewal or take-over)."""
    ours = spec.get("holderIdentity") == identity
    transitions = int(spec.get("leaseTransitions") or 0)
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": LEASE_S,
        "acquireTime": spec.get("acquireTime") if ours else _micro_time(now),
        "renewTime": _micro_time(now),
        "leaseTransitions": transitions
        if ours or not spec.get("holderIdentity")
        else transitions + 1,
    }


class Elector:
    def __init__(self, api: KubeApi, namespace: str, identity: str, name: str = LEASE_NAME) -> None:
        self.api = api
        self.identity = identity
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.namespace, self.name = namespace, name
        self.leader = False
        self._renewed_at = 0.0

    async def _try(self) -> bool:
        """One attempt to take or renew the lease; True if we hold it now."""
        now = time.time()
        try:
            lease = await self.api.get(self.path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": taken_spec({}, self.identity, now),
            }
            try:
                await self.api.request("POST", self.path.rsplit("/", 1)[0], body)
            except ApiError as exc:
                if exc.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        if not can_take(spec, self.identity, now):
            return False
        # The resourceVersion makes this a compare-and-swap: of two candidates, one wins.
        lease["spec"] = taken_spec(spec, self.identity, now)
        try:
            await self.api.request("PUT", self.path, lease)
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this process holds the lease."""
        logger.info("waiting for the lease %s/%s as %s", self.namespace, self.name, self.identity)
        while True:
            try:
                if await self._try():
                    break
            except (ApiError, OSError, TimeoutError) as exc:
                logger.warning("lease: %s", exc)
            await asyncio.sleep(RENEW_S)
        self.leader = True
        self._renewed_at = time.monotonic()
        logger.info("leading: this controller holds the lease %s/%s", self.namespace, self.name)

    async def keep(self) -> None:
        """Renew until the lease is someone else's, or renewal has failed for longer than is
        safe (well before it could expire for the others); then raise LeadershipLost."""
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                if await self._try():
                    self._renewed_at = time.monotonic()
                    continue
                reason, lost = "another controller holds the lease", True
            except (ApiError, OSError, TimeoutError) as exc:
                reason = f"renewal failed: {exc}"
                lost = time.monotonic() - self._renewed_at > LEASE_S / 2
            if lost:
                self.leader = False
                raise LeadershipLost(reason)
            logger.warning("lease: %s; retrying", reason)

    async def release(self) -> None:
        """Give the lease up at shutdown, so a standby takes over at once."""
        if not self.leader:
            return
        self.leader = False
        try:
            lease = await self.api.get(self.path)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                await self.api.request("PUT", self.path, lease)
                logger.info("released the lease %s/%s", self.namespace, self.name)
        except (ApiError, OSError, TimeoutError) as exc:
            logger.warning("could not release the lease (it expires in %ss): %s", LEASE_S, exc)
