"""A participant that voted commit and hears nothing asks for the outcome itself: it reads
the TwoPhaseTransaction with its own service account (the chart grants get on them in the
namespaces it watches) and applies a recorded decision through the fence. With no decision
recorded it waits: it never decides alone. Also collects the journal's old entries, a
bounded batch at a time."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from accord_sidecar import fence
from accord_sidecar.config import Config
from accord_sidecar.inbound import Inbound
from accord_sidecar.kube import KubeAccess

log = logging.getLogger("accord.sidecar.outcome")
GROUP_VERSION = "accord.dev/v1alpha1"


async def decision_of(kube: KubeAccess, session: Any, ref: str, txid: str) -> str | None:
    """The recorded decision, "Commit" or "Abort"; None when not decided or not readable now.

    A transaction that is gone (404, or the name now holds another one) presumes abort: its
    finalizer keeps it until every participant acknowledged phase 2, so a Commit can never
    have been decided with this participant still waiting to hear it."""
    namespace, _, name = ref.partition("/")
    url = (
        f"{kube.config.kube_api_url}/apis/{GROUP_VERSION}/namespaces/{namespace}"
        f"/twophasetransactions/{name}"
    )
    import aiohttp  # HTTPS to the API server: aiohttp's client

    try:
        async with session.get(
            url, headers=kube.headers(), ssl=kube.context(), timeout=aiohttp.ClientTimeout(total=5)
        ) as r:
            if r.status == 404 and await _is_gone(r, name):
                log.warning("transaction %s: %s is gone: presumed abort", txid, ref)
                return "Abort"
            if r.status != 200:
                log.warning("transaction %s: reading %s gave HTTP %s", txid, ref, r.status)
                return None
            tx: dict[str, Any] = await r.json()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.warning("transaction %s: cannot read %s: %s", txid, ref, exc)
        return None
    if (tx.get("metadata") or {}).get("uid") != txid:
        log.warning("transaction %s: %s is now another transaction (it is gone): presumed "
                    "abort", txid, ref)  # fmt: skip
        return "Abort"
    decision = (tx.get("status") or {}).get("decision")
    return decision if decision in ("Commit", "Abort") else None


async def _is_gone(r: Any, name: str) -> bool:
    """The API server's own NotFound for this very transaction (not a 404 from a proxy or a
    wrong address, which says nothing about it)."""
    try:
        body = await r.json(content_type=None)
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and body.get("reason") == "NotFound"
        and (body.get("details") or {}).get("name") == name
    )


async def watch(config: Config, inbound: Inbound, session: Any) -> None:
    kube = KubeAccess(config)
    every = config.tpc_outcome_after_s
    while True:
        await asyncio.sleep(every)
        try:
            inbound.journal.collect()
            for txid, state, ref, prefix in inbound.in_doubt_here(every):
                if state == fence.VOTED_COMMIT:
                    if not kube.configured:
                        continue  # no way to ask: the coordinator's retries will come
                    decision = await decision_of(kube, session, ref, txid)
                    if decision is None:
                        continue
                else:  # told already, not yet done: finish it
                    decision = "Commit" if state == fence.COMMITTING else "Abort"
                kind = "commit" if decision == "Commit" else "abort"
                status = await inbound.apply_outcome(txid, kind, ref, prefix)
                log.info("transaction %s (%s): no word from the coordinator; applied its "
                         "recorded %s (%s)", txid, ref, kind, status)  # fmt: skip
        except Exception:
            log.exception("asking for transaction outcomes failed; again in %ss", every)
