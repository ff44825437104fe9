"""Running the operator: kopf settings, the metrics server, and the main coroutine."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from aiohttp import web

from accord_operator import metrics
from accord_operator.resources import GROUP
from accord_operator.settings import Settings

logger = logging.getLogger("accord.operator")


def configure(kopf_settings: kopf.OperatorSettings) -> None:
    # Keep kopf's bookkeeping in our own annotations: our status schemas are structural,
    # so kopf's default status.kopf field would be pruned by the API server.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{GROUP}/finalizer"
    kopf_settings.posting.level = logging.INFO
    kopf_settings.watching.server_timeout = 300
    kopf_settings.networking.request_timeout = 60


def register_handlers() -> None:
    """Import the handler modules; importing registers them with kopf's default registry."""
    from accord_operator.projection import handlers as _projection  # noqa: F401
    from accord_operator.saga import handlers as _saga  # noqa: F401
    from accord_operator.twophase import handlers as _twophase  # noqa: F401


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    register_handlers()

    @kopf.on.startup()
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    runner: web.AppRunner = await metrics.serve(settings.metrics_host, settings.metrics_port)
    logger.info("metrics and /healthz on %s:%d", settings.metrics_host, settings.metrics_port)
    try:
        await kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            stop_flag=stop,
        )
    finally:
        await runner.cleanup()
