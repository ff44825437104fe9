"""The operator's one Prometheus registry and its metrics, served with /healthz."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from accord_operator import __version__

REGISTRY = CollectorRegistry()

BUILD = Info("accord_operator_build", "Version of the running operator.", registry=REGISTRY)
BUILD.info({"version": __version__})

RECONCILES = Counter(
    "accord_reconciles_total",
    "Reconciliations handled, by kind and outcome.",
    ["kind", "outcome"],
    registry=REGISTRY,
)
PHASE_TRANSITIONS = Counter(
    "accord_phase_transitions_total",
    "Phase changes written to status, by kind and the phase entered.",
    ["kind", "phase"],
    registry=REGISTRY,
)

INJECTIONS = Counter(
    "accord_injections_total",
    "Pod admissions seen by the injector, by result (injected, skipped, refused).",
    ["result"],
    registry=REGISTRY,
)
INJECTION_MISSES = Counter(
    "accord_injection_misses_total",
    "Pods that asked for the sidecar but were created without it (webhook unreachable).",
    ["namespace"],
    registry=REGISTRY,
)
ADMISSION_SECONDS = Histogram(
    "accord_admission_duration_seconds",
    "Time to answer one admission review, from request parsed to response built.",
    buckets=(
        0.00025,
        0.0005,
        0.00075,
        0.001,
        0.0015,
        0.002,
        0.003,
        0.004,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
    ),
    registry=REGISTRY,
)


class PhaseGauge:
    """A gauge read on each scrape from `source` (the supervisor's view of the watch), so it
    costs nothing in between: by phase (accord_sagas{phase}), or one value (label None)."""

    def __init__(self, name: str, documentation: str, label: str | None = "phase") -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.source: Callable[[], dict[str, int] | int] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = self.source()
        if isinstance(value, int):
            yield GaugeMetricFamily(self.name, self.documentation, value=value)
            return
        family = GaugeMetricFamily(self.name, self.documentation, labels=[str(self.label)])
        for phase, count in sorted(value.items()):
            family.add_metric([phase], count)
        yield family


SAGAS_BY_PHASE = PhaseGauge("accord_sagas", "Sagas in each phase now.")
REGISTRY.register(SAGAS_BY_PHASE)  # type: ignore[arg-type]

SAGAS = Counter(
    "accord_sagas_total",
    "Sagas that reached a terminal phase, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
SAGA_STEP_SECONDS = Histogram(
    "accord_saga_step_duration_seconds",
    "Time of one successful step call (action or compensation).",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
SAGA_RETRIES = Counter(
    "accord_saga_step_retries_total",
    "Failed step attempts that will be retried, by kind.",
    ["kind"],
    registry=REGISTRY,
)
SAGA_COMPENSATIONS = Counter(
    "accord_saga_compensations_total",
    "Step compensations completed.",
    registry=REGISTRY,
)


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def serve(
    host: str, port: int, ready: Callable[[], str | None] = lambda: None
) -> web.AppRunner:
    """Start /metrics, /healthz and /readyz (ready() says why not, or None when ready);
    the caller cleans the runner up on shutdown."""

    async def readyz(_: web.Request) -> web.Response:
        why = ready()
        if why is not None:
            return web.json_response({"status": "not ready", "reason": why}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


# -- TwoPhaseTransaction -----------------------------------------------------------------------

TRANSACTIONS_BY_PHASE = PhaseGauge("accord_transactions", "Transactions driven now, by phase.")
REGISTRY.register(TRANSACTIONS_BY_PHASE)  # type: ignore[arg-type]


TRANSACTIONS_IN_DOUBT = PhaseGauge(
    "accord_transaction_participants_in_doubt",
    "Participants in doubt now (phase 2 unacknowledged after 5 attempts; retried).",
    label=None,
)
TRANSACTIONS_IN_DOUBT.source = lambda: 0
REGISTRY.register(TRANSACTIONS_IN_DOUBT)  # type: ignore[arg-type]
TRANSACTIONS = Counter(
    "accord_transactions_total",
    "Transactions that finished, by outcome (Committed or Aborted).",
    ["outcome"],
    registry=REGISTRY,
)
TRANSACTION_DECISIONS = Counter(
    "accord_transaction_decisions_total",
    "Decisions recorded, by decision (Commit or Abort).",
    ["decision"],
    registry=REGISTRY,
)
TRANSACTION_PHASE_SECONDS = Histogram(
    "accord_transaction_phase_duration_seconds",
    "How long phase 1 (prepare: start to decision) and phase 2 (commit or abort: decision to "
    "the last acknowledgement) took.",
    ["phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
TRANSACTIONS_IN_DOUBT_TOTAL = Counter(
    "accord_transaction_in_doubt_total",
    "Times a participant became in doubt.",
    registry=REGISTRY,
)

# -- projections: the broker's figures as the last pass read them, one series per projection
PROJECTION_LAG = Gauge(
    "accord_projection_lag",
    "Events published to a projection's topic and not yet projected (the broker's count).",
    ["namespace", "projection"],
    registry=REGISTRY,
)
PROJECTION_POSITION = Gauge(
    "accord_projection_position",
    "Stream sequence up to which every event of the projection's topic is projected.",
    ["namespace", "projection"],
    registry=REGISTRY,
)
PROJECTION_EVENTS = Gauge(
    "accord_projection_events_processed",
    "Events projected by the generation building the read model.",
    ["namespace", "projection"],
    registry=REGISTRY,
)
PROJECTION_PARKED = Gauge(
    "accord_projection_parked_events",
    "Events waiting behind a poison event of their key (poison events included).",
    ["namespace", "projection"],
    registry=REGISTRY,
)
PROJECTION_DEAD_LETTERED = Gauge(
    "accord_projection_dead_lettered",
    "Events the generation building the read model sent to the dead-letter topic.",
    ["namespace", "projection"],
    registry=REGISTRY,
)
PROJECTION_SWITCHES = Counter(
    "accord_projection_generation_switches_total",
    "Rebuilt read models that took over the query Service.",
    registry=REGISTRY,
)


def forget_projection(namespace: str, name: str) -> None:
    """A deleted projection's series go with it."""
    for gauge in (
        PROJECTION_LAG,
        PROJECTION_POSITION,
        PROJECTION_EVENTS,
        PROJECTION_PARKED,
        PROJECTION_DEAD_LETTERED,
    ):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
