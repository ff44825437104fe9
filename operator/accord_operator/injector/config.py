"""Turn a pod's accord.dev/* annotations into the sidecar's configuration (pure, no I/O).

Every value is checked here: a pod that asked for injection with a bad annotation is
refused naming the annotation, rather than getting a sidecar that crash-loops.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from accord_wire import INJECT, NAMESPACE_LABEL, PREFIX, check_targets
from accord_wire import NATIVE_SIDECAR as NATIVE
from accord_wire import SIDECAR_STATUS as STATUS

__all__ = ["INJECT", "NAMESPACE_LABEL", "NATIVE", "PREFIX", "STATUS"]
SIDECAR_NAME: Final = "accord-sidecar"

_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_RESOURCE_ANNOTATIONS: Final = {
    "sidecar-cpu-request": ("requests", "cpu"),
    "sidecar-memory-request": ("requests", "memory"),
    "sidecar-cpu-limit": ("limits", "cpu"),
    "sidecar-memory-limit": ("limits", "memory"),
}
# Annotations read here; anything else under accord.dev/ is left alone (forward compatible).
KNOWN: Final = frozenset(
    {
        "inject",
        "sidecar-status",
        "native-sidecar",
        "app-port",
        "subscribe",
        "log-level",
        "retry-max-attempts",
        "retry-initial-ms",
        "retry-max-ms",
        "timeout-ms",
        "http-port",
        "inbound-port",
        "admin-port",
        "target-policies",
        "subscribe-concurrency",
        "subscribe-bulk",
        "subscribe-partitions",
        "max-deliveries",
        "tpc-outcome-after-seconds",
        "subscribe-start",
        "subscribe-poison",
        "subscribe-reset",
        *_RESOURCE_ANNOTATIONS,
    }
)


class AnnotationError(ValueError):
    """A bad accord.dev/* annotation; the message names it."""


@dataclass(frozen=True)
class Ports:
    http: int = 3500  # app-facing API, loopback only
    inbound: int = 3501  # participant traffic from the operator and other services
    admin: int = 9090  # /metrics, /healthz, /readyz


@dataclass(frozen=True)
class SidecarConfig:
    ports: Ports = Ports()
    app_port: int | None = None
    subscribe: tuple[str, ...] = ()
    log_level: str = "info"
    retry_max_attempts: int | None = None
    retry_initial_ms: int | None = None
    retry_max_ms: int | None = None
    timeout_ms: int | None = None
    native: bool | None = None  # None: decided from the cluster version
    target_policies: str | None = None  # JSON, checked here, passed as ACCORD_TARGETS
    subscribe_concurrency: int | None = None
    subscribe_bulk: int | None = None
    subscribe_partitions: int | None = None
    max_deliveries: int | None = None
    tpc_outcome_after_s: int | None = None
    subscribe_start: str | None = None  # "all" | "new": where a new subscription starts
    subscribe_poison: str | None = None  # "deadletter" | "park": what a poison event does
    subscribe_reset: str | None = None  # the app's path to empty its model before a replay
    resources: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )


def _int(annotations: Mapping[str, str], key: str, lo: int, hi: int) -> int | None:
    raw = annotations.get(PREFIX + key)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise AnnotationError(f"{PREFIX}{key}: {raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise AnnotationError(f"{PREFIX}{key}: {value} is out of range ({lo} to {hi})")
    return value


def _bool(annotations: Mapping[str, str], key: str) -> bool | None:
    raw = annotations.get(PREFIX + key)
    if raw is None:
        return None
    if raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise AnnotationError(f'{PREFIX}{key}: {raw!r} must be "true" or "false"')


def parse(annotations: Mapping[str, str]) -> SidecarConfig:
    """The sidecar configuration a pod asks for; AnnotationError names a bad annotation."""
    ports = Ports(
        http=_int(annotations, "http-port", 1, 65535) or Ports.http,
        inbound=_int(annotations, "inbound-port", 1, 65535) or Ports.inbound,
        admin=_int(annotations, "admin-port", 1, 65535) or Ports.admin,
    )
    if len({ports.http, ports.inbound, ports.admin}) != 3:
        raise AnnotationError(f"{PREFIX}http-port, inbound-port and admin-port must differ")
    app_port = _int(annotations, "app-port", 1, 65535)
    if app_port is not None and app_port in (ports.http, ports.inbound, ports.admin):
        raise AnnotationError(f"{PREFIX}app-port: {app_port} is taken by the sidecar")

    subscribe: tuple[str, ...] = ()
    raw_subscribe = annotations.get(PREFIX + "subscribe")
    if raw_subscribe is not None:
        topics = tuple(t.strip() for t in raw_subscribe.split(",") if t.strip())
        bad = [t for t in topics if not _TOPIC.match(t)]
        if bad or not topics:
            raise AnnotationError(
                f"{PREFIX}subscribe: {', '.join(bad) or repr(raw_subscribe)} is not a topic list "
                "(comma-separated, letters, digits, '_' and '-' in '.'-separated tokens)"
            )
        subscribe = topics
        if app_port is None:
            raise AnnotationError(f"{PREFIX}subscribe needs {PREFIX}app-port to deliver events to")

    log_level = annotations.get(PREFIX + "log-level", "info").strip().lower()
    if log_level not in _LOG_LEVELS:
        raise AnnotationError(
            f"{PREFIX}log-level: {log_level!r} is not one of {', '.join(_LOG_LEVELS)}"
        )

    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    for key, (section, resource) in _RESOURCE_ANNOTATIONS.items():
        raw = annotations.get(PREFIX + key)
        if raw is not None:
            if not _QUANTITY.match(raw.strip()):
                raise AnnotationError(f"{PREFIX}{key}: {raw!r} is not a resource quantity")
            resources[section][resource] = raw.strip()

    retry_initial = _int(annotations, "retry-initial-ms", 0, 3_600_000)
    retry_max = _int(annotations, "retry-max-ms", 0, 3_600_000)
    if retry_initial is not None and retry_max is not None and retry_max < retry_initial:
        raise AnnotationError(f"{PREFIX}retry-max-ms must be at least {PREFIX}retry-initial-ms")

    target_policies = annotations.get(PREFIX + "target-policies")
    if target_policies is not None:
        try:
            parsed = json.loads(target_policies)
        except ValueError as exc:
            raise AnnotationError(f"{PREFIX}target-policies is not JSON: {exc}") from None
        try:
            # The sidecar checks its env the same way: what is admitted here starts there.
            check_targets(parsed, f"{PREFIX}target-policies")
        except ValueError as exc:
            raise AnnotationError(str(exc)) from None

    subscribe_poison = annotations.get(PREFIX + "subscribe-poison")
    if subscribe_poison is not None and subscribe_poison not in ("deadletter", "park"):
        raise AnnotationError(
            f"{PREFIX}subscribe-poison: {subscribe_poison!r} is not deadletter or park"
        )
    subscribe_reset = annotations.get(PREFIX + "subscribe-reset")
    if subscribe_reset is not None and (
        not subscribe_reset.startswith("/")
        or len(subscribe_reset) > 200
        or not subscribe_reset.isprintable()
        or " " in subscribe_reset
    ):
        raise AnnotationError(
            f"{PREFIX}subscribe-reset: {subscribe_reset!r} is not a path (/..., at most 200 "
            "characters, no spaces)"
        )
    subscribe_start = annotations.get(PREFIX + "subscribe-start")
    if subscribe_start is not None and subscribe_start not in ("all", "new"):
        raise AnnotationError(f"{PREFIX}subscribe-start: {subscribe_start!r} is not all or new")

    return SidecarConfig(
        subscribe_start=subscribe_start,
        subscribe_poison=subscribe_poison,
        subscribe_reset=subscribe_reset,
        target_policies=target_policies,
        subscribe_concurrency=_int(annotations, "subscribe-concurrency", 1, 1000),
        subscribe_bulk=_int(annotations, "subscribe-bulk", 1, 1000),
        subscribe_partitions=_int(annotations, "subscribe-partitions", 1, 256),
        max_deliveries=_int(annotations, "max-deliveries", 1, 1000),
        tpc_outcome_after_s=_int(annotations, "tpc-outcome-after-seconds", 1, 86400),
        ports=ports,
        app_port=app_port,
        subscribe=subscribe,
        log_level=log_level,
        retry_max_attempts=_int(annotations, "retry-max-attempts", 1, 100),
        retry_initial_ms=retry_initial,
        retry_max_ms=retry_max,
        timeout_ms=_int(annotations, "timeout-ms", 1, 3_600_000),
        native=_bool(annotations, "native-sidecar"),
        resources=resources,
    )


def status_annotation(version: str, image: str, native: bool) -> str:
    """What accord.dev/sidecar-status records: what was injected, by which version."""
    return json.dumps(
        {"version": version, "image": image, "containers": [SIDECAR_NAME], "native": native},
        separators=(",", ":"),
        sort_keys=True,
    )
