"""The kopf shell of the injector: the admission handlers and the miss detector."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from accord_operator.injector import misses
from accord_operator.injector.mutate import mutate


def register_webhooks(registry: kopf.OperatorRegistry) -> None:
    # Two paths, so that the MutatingWebhookConfiguration's namespaceSelector says which
    # pods come from a namespace with accord.dev/injection=enabled: no namespace lookups
    # (and no cache to warm up) on the admission path.
    @kopf.on.mutate("", "v1", "pods", operation="CREATE", id="inject-sidecar", registry=registry)
    async def inject_sidecar(
        body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kw: Any
    ) -> None:
        mutate(
            body, patch, memo.injector, namespace=kw.get("namespace") or "", namespace_enabled=False
        )

    @kopf.on.mutate(
        "", "v1", "pods", operation="CREATE", id="inject-sidecar-namespace", registry=registry
    )
    async def inject_sidecar_namespace(
        body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kw: Any
    ) -> None:
        mutate(
            body, patch, memo.injector, namespace=kw.get("namespace") or "", namespace_enabled=True
        )


def register_controllers(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.event("", "v1", "pods", id="sidecar-miss-detector", registry=registry)
    async def detect_miss(
        body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
    ) -> None:
        await misses.check(body, memo.injector, memo.api, logger)
