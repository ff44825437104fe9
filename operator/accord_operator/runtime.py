"""Running the operator: kopf settings, run modes, the webhook server and metrics."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import enum
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

import accord_wire as wire
from accord_operator import __version__, metrics
from accord_operator.injector import handlers as injector_handlers
from accord_operator.injector.patch import Injector, supports_native_sidecars
from accord_operator.kubeapi import KubeApi
from accord_operator.leader import Elector
from accord_operator.participants import AudienceToken, Participants
from accord_operator.projection import handlers as projection_handlers
from accord_operator.projection.broker import BrokerView
from accord_operator.resources import GROUP, SAGA, TWO_PHASE
from accord_operator.saga import handlers as saga_handlers
from accord_operator.saga.runner import SagaDriver
from accord_operator.settings import Settings
from accord_operator.twophase import handlers as twophase_handlers
from accord_operator.twophase.runner import TpcDriver

logger = logging.getLogger("accord.operator")


class Mode(enum.Enum):
    ALL = "all"
    CONTROLLER = "controller"  # reconcilers only: run exactly one
    WEBHOOK = "webhook"  # admission only: run as many replicas as you like


LIST_CHUNK = 200
WORKERS = 100  # objects processed at once: bounds the peak memory of a big start-up listing
# How long kopf keeps an object's worker after its last event. A worker holds one of the
# WORKERS slots while it idles, so the watch takes in at most WORKERS / WORKER_IDLE_S new
# objects a second, and stalls (every object's events wait) once more arrive. kopf's 5 s
# capped intake at 20 objects/s: 2PC and sagas could go no faster. Our handlers only hand
# the event on (supervisor.see), so a worker is cheap to start again.
WORKER_IDLE_S = 0.5


def configure(kopf_settings: kopf.OperatorSettings) -> None:
    # Keep kopf's bookkeeping in our own annotations: our status schemas are structural,
    # so kopf's default status.kopf field would be pruned by the API server.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{GROUP}/finalizer"
    kopf_settings.posting.level = logging.INFO
    # Events say they come from us (kubectl describe's "From"), not from the framework.
    kopf_settings.posting.reporting_component = "accord-operator"
    kopf_settings.watching.server_timeout = 300
    kopf_settings.networking.request_timeout = 60
    # List in pages: one big listing of every object, parsed at once, sets a peak the
    # process then keeps as its resident size.
    kopf_settings.watching.chunk_size = LIST_CHUNK
    kopf_settings.queueing.worker_limit = WORKERS
    kopf_settings.queueing.idle_timeout = WORKER_IDLE_S
    # Only the sagas the operator still drives: finished ones never reach it (see the CRD's
    # selectableFields), so they cost nothing however many there are.
    kopf_settings.watching.field_selectors[GROUP, SAGA.plural] = (
        "status.phase!=Succeeded,status.phase!=Compensated"
    )
    kopf_settings.watching.field_selectors[GROUP, TWO_PHASE.plural] = (
        "status.phase!=Committed,status.phase!=Aborted"
    )


async def _give_back_memory(every: float = 30.0) -> None:
    """Return freed heap to the system now and then. The initial listing of a big cluster
    (every saga, parsed at once) leaves the C heap large and mostly free; without this the
    process keeps that peak as its resident size for good."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: nothing to do
    while True:
        await asyncio.sleep(every)
        trim(0)


def registry_for(mode: Mode) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    # A registry of our own has none of kopf's default login handlers: log in the way
    # the kubernetes client does (in-cluster service account, else the kubeconfig).
    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    if mode in (Mode.ALL, Mode.CONTROLLER):
        saga_handlers.register(registry)
        twophase_handlers.register(registry)
        projection_handlers.register(registry)
        injector_handlers.register_controllers(registry)
    if mode in (Mode.ALL, Mode.WEBHOOK):
        injector_handlers.register_webhooks(registry)
        saga_handlers.register_webhooks(registry)
        twophase_handlers.register_webhooks(registry)
    return registry


class TimedWebhookServer(kopf.WebhookServer):
    """kopf's webhook server, timing every admission review into the metrics."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def timed(request: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(request, **kwargs)
            finally:
                metrics.ADMISSION_SECONDS.observe(time.perf_counter() - started)

        async for client_config in super().__call__(timed):
            yield client_config


def webhook_server(settings: Settings) -> kopf.WebhookServer:
    cert_dir = Path(settings.webhook_cert_dir) if settings.webhook_cert_dir else None
    if cert_dir is None:
        # No certificates given (a local run): make a self-signed pair. In a cluster the
        # chart mounts them (cert-manager or Helm-generated) into ACCORD_WEBHOOK_CERT_DIR.
        from accord_operator.certs import CertificateAuthority

        cert_dir = Path(tempfile.mkdtemp(prefix="accord-webhook-"))
        atexit.register(shutil.rmtree, cert_dir, ignore_errors=True)  # no leftover per run
        ca = CertificateAuthority("accord-webhook-ca")
        (cert_dir / "ca.crt").write_bytes(ca.cert_pem)
        pair = ca.issue("accord-webhook", hosts=("127.0.0.1", "localhost"), server=True)
        pair.write(cert_dir, "tls")
        logger.info("webhook: self-signed certificate, CA in %s", cert_dir / "ca.crt")
    return TimedWebhookServer(
        addr="0.0.0.0",
        port=settings.webhook_port,
        certfile=str(cert_dir / "tls.crt"),
        pkeyfile=str(cert_dir / "tls.key"),
    )


async def make_injector(settings: Settings, api: KubeApi) -> Injector:
    if settings.native_sidecars == "auto":
        version = str((await api.get("/version"))["gitVersion"])
        native = supports_native_sidecars(version)
        logger.info("cluster %s: native sidecars %s", version, "on" if native else "off")
    else:
        native = settings.native_sidecars == "true"
    return Injector(
        image=settings.sidecar_image,
        version=__version__,
        nats_url=settings.nats_url,
        native_by_default=native,
        operator_namespace=settings.operator_namespace,
        token_audience=settings.participant_audience,
        broker_env=settings.broker_env,
    )


async def run(settings: Settings, mode: Mode = Mode.ALL, stop: asyncio.Event | None = None) -> None:
    registry = registry_for(mode)

    @kopf.on.startup(registry=registry)
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        if mode in (Mode.ALL, Mode.WEBHOOK):
            settings.admission.server = server

    server = webhook_server(settings) if mode in (Mode.ALL, Mode.WEBHOOK) else None
    api = KubeApi()
    # In a cluster (the chart sets our service account), participants get an audience token.
    in_cluster = bool(settings.service_account and settings.operator_namespace)
    audience_token = None
    if in_cluster and not settings.participant_token:
        audience_token = AudienceToken(
            api,
            settings.operator_namespace,
            settings.service_account,
            settings.participant_audience,
        )
    participants = Participants(api, settings.participant_token, audience_token)
    memo = kopf.Memo(
        injector=await make_injector(settings, api),
        api=api,
        sagas=SagaDriver(api, participants),
        transactions=TpcDriver(api, participants),
        broker=BrokerView(
            settings.nats_url, wire.stream_config_from_env(dict(settings.broker_env))
        ),
        namespaces=tuple(settings.namespaces),
    )
    elector = None
    if mode in (Mode.ALL, Mode.CONTROLLER) and settings.leader_election:
        elector = Elector(api, settings.operator_namespace or "default", settings.identity)

    def ready() -> str | None:
        # A standby is alive (healthz) but not ready: Services and rollouts see the leader.
        return None if elector is None or elector.leader else "waiting for the leader lease"

    runner: web.AppRunner = await metrics.serve(
        settings.metrics_host, settings.metrics_port, ready=ready
    )
    logger.info(
        "mode %s; metrics, /healthz and /readyz on %s:%d",
        mode.value,
        settings.metrics_host,
        settings.metrics_port,
    )
    stop = stop or asyncio.Event()
    trimmer = asyncio.create_task(_give_back_memory())
    keeper: asyncio.Task[None] | None = None
    try:
        if elector is not None:
            await elector.acquire()
            keeper = asyncio.create_task(elector.keep())
            # Losing the lease stops the reconcilers at once; the process then exits non-zero
            # and comes back as a candidate.
            keeper.add_done_callback(lambda _: stop.set())
        await kopf.operator(
            registry=registry,
            memo=memo,
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            stop_flag=stop,
        )
        if keeper is not None and keeper.done() and not keeper.cancelled():
            keeper.result()  # raises LeadershipLost
    finally:
        trimmer.cancel()
        if keeper is not None and not keeper.done():
            keeper.cancel()
        if elector is not None:
            await elector.release()
        await runner.cleanup()
        await participants.close()
        await memo.broker.close()
        await api.close()
