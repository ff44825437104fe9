"""The sidecar's one Prometheus registry."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

from accord_sidecar import __version__

# One series per counter, not two: the *_created series doubles what Prometheus stores.
disable_created_metrics()
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes..
REGISTRY.register(PLATFORM_COLLECTOR)

# Label values are bounded: a caller choosing target or topic names cannot grow the series
# without end. Configured targets and subscribed topics get their own value; the rest, OTHER.
OTHER = "other"
_known_targets: frozenset[str] = frozenset()
_known_topics: frozenset[str] = frozenset()


def configure(targets: Iterable[str], topics: Iterable[str]) -> None:
    global _known_targets, _known_topics
    _known_targets = frozenset(targets)
    _known_topics = frozenset(topics)


def target_label(target: str) -> str:
    if target in _known_targets:
        return target
    name = target.partition(":")[0]
    return name if name in _known_targets else OTHER


def topic_label(topic: str) -> str:
    return topic if topic in _known_topics else OTHER


Info("accord_sidecar_build", "Version of the running sidecar.", registry=REGISTRY).info(
    {"version": __version__}
)

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

OUTBOUND_REQUESTS = Counter(
    "accord_sidecar_outbound_requests_total",
    "Outbound invocations, by target and final status.",
    ["target", "status"],
    registry=REGISTRY,
)
OUTBOUND_LATENCY = Histogram(
    "accord_sidecar_outbound_duration_seconds",
    "Outbound invocation time, retries included.",
    ["target"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
RETRIES = Counter(
    "accord_sidecar_retries_total",
    "Retries of outbound calls, by target.",
    ["target"],
    registry=REGISTRY,
)
RETRIES_DENIED = Counter(
    "accord_sidecar_retries_denied_total",
    "Retries refused by the retry budget, by target.",
    ["target"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "accord_sidecar_breaker_state",
    "Circuit breaker state per target: 0 closed, 1 open, 2 half-open.",
    ["target"],
    registry=REGISTRY,
)
BREAKER_REJECTED = Counter(
    "accord_sidecar_breaker_rejected_total",
    "Calls refused fast because the breaker was open.",
    ["target"],
    registry=REGISTRY,
)
FENCED = Counter(
    "accord_sidecar_fenced_total",
    "Saga actions refused because their compensation had already been asked for (late "
    "actions that never reached the app).",
    registry=REGISTRY,
)
INBOUND_REQUESTS = Counter(
    "accord_sidecar_inbound_requests_total",
    "Inbound calls, by status and outcome.",
    ["status", "outcome"],
    registry=REGISTRY,
)
INBOUND_LATENCY = Histogram(
    "accord_sidecar_inbound_duration_seconds",
    "Inbound call time (app included).",
    buckets=_LATENCY,
    registry=REGISTRY,
)
PUBLISHED = Counter(
    "accord_sidecar_published_total",
    "Events published, by topic and result.",
    ["topic", "result"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "accord_sidecar_deliveries_total",
    "Deliveries to the app, by topic and outcome.",
    ["topic", "outcome"],
    registry=REGISTRY,
)
REDELIVERIES = Counter(
    "accord_sidecar_redeliveries_total",
    "Events delivered more than once, by topic.",
    ["topic"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "accord_sidecar_dead_lettered_total",
    "Events moved to <topic>.dlq, by topic.",
    ["topic"],
    registry=REGISTRY,
)
PARKED = Counter(
    "accord_sidecar_parked_total",
    "Events parked behind a poison event of their key (ACCORD_POISON=park), by topic.",
    ["topic"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "accord_sidecar_consumer_lag",
    "Events on the stream not yet delivered, by topic.",
    ["topic"],
    registry=REGISTRY,
)
