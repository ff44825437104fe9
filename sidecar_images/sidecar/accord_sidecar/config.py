"""The sidecar's configuration: environment only (ACCORD_*), so the same binary runs
unchanged in a pod (where the injector writes these) and on a laptop or in tests."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import accord_wire as wire

TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
SERVICE = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]{1,5})?$"
)


class ConfigError(ValueError):
    """A bad ACCORD_* variable; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int = 0, hi: int = 2**31) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range ({lo} to {hi})")
    return value


def _path(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if value and (not value.startswith("/") or " " in value or not value.isprintable()):
        raise ConfigError(f"{name}={value!r} is not a path (/...)")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when unset)."""
    value = env.get(name, "").strip() or choices[0]
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _broker(env: Mapping[str, str], name: str, default: str) -> str:
    """A stream setting, checked by the rule the operator checks it with (accord_wire)."""
    try:
        return wire.check_broker_setting(name, env.get(name, "").strip() or default)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _services(raw: str) -> dict[str, str]:
    """ACCORD_SERVICES="inventory=127.0.0.1:8081,payment=http://127.0.0.1:8082"."""
    out: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in raw.split(","))):
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ConfigError(f"ACCORD_SERVICES: {item!r} is not name=host:port")
        target = target.strip()
        out[name.strip()] = target if "://" in target else f"http://{target}"
    return out


# Per-target overrides: ACCORD_TARGETS='{"payment": {"timeoutMs": 500, "maxAttempts": 5}}'
TARGET_FIELDS = wire.TARGET_FIELDS


def _targets(raw: str) -> dict[str, dict[str, int]]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"ACCORD_TARGETS is not JSON: {exc}") from None
    try:
        return wire.check_targets(data, "ACCORD_TARGETS")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class RetryDefaults:
    max_attempts: int = 3
    initial_ms: int = 100
    max_ms: int = 2000
    exponential: bool = True


@dataclass(frozen=True)
class Config:
    http_port: int = 3500
    inbound_port: int = 3501
    admin_port: int = 9090
    bind_host: str = "0.0.0.0"  # inbound and admin; the app-facing port is loopback only
    app_host: str = "127.0.0.1"
    app_port: int | None = None
    app_id: str = "app"
    namespace: str = "default"
    nats_url: str = ""
    subscribe: tuple[str, ...] = ()
    max_deliveries: int = 5
    concurrency: int = 1  # per subscription; 1 keeps delivery ordered per subject
    bulk_max: int = 1  # >1: deliver up to this many events in one POST (CloudEvents batch)
    prefetch: int = 256  # ordered delivery: events fetched from the broker per pull
    partitions: int = 1  # >1: each subscription split by partition key, shared by replicas
    poison: str = "deadletter"  # ordered: "park" holds back the key of a dead-lettered event
    reset_path: str = ""  # ordered: POSTed on the app before a consumer's first delivery
    redelivery_initial_ms: int = 200
    redelivery_max_ms: int = 10_000
    retry: RetryDefaults = RetryDefaults()
    timeout_ms: int = 10_000
    retry_budget_percent: int = 20
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 5_000
    services: dict[str, str] = field(default_factory=dict)
    targets: dict[str, dict[str, int]] = field(default_factory=dict)
    max_body_bytes: int = 1 << 20
    data_dir: str = ""
    dedup_max_entries: int = 10_000
    dedup_ttl_s: int = 3600
    # The saga fence: how long a compensation keeps fencing off its late action.
    journal_retention_s: int = 7 * 86400
    journal_max_entries: int = 100_000
    # A participant that voted commit and heard nothing for this long reads the outcome.
    tpc_outcome_after_s: int = 60
    shared_token: str = ""
    allowed_service_accounts: tuple[str, ...] = ()
    kube_api_url: str = ""
    kube_ca_file: str = ""
    kube_token_file: str = ""
    kube_client_cert: str = ""
    kube_client_key: str = ""
    # Callers' service-account tokens must be for this audience (TokenRequest): a token
    # for the API server, which could do anything there, is never accepted here.
    token_audience: str = wire.PARTICIPANT_AUDIENCE
    shutdown_grace_s: int = 20
    # A client has this long to send a request's headers (from connecting, or since its last
    # answer on a kept-alive connection), and this long to send a body: a slow client cannot
    # hold connections (slowloris). Idle kept-alive connections close after the first.
    header_timeout_s: int = 30
    body_timeout_s: int = 60
    # The JetStream stream (chart values nats.stream.*) and what a new subscription replays.
    stream_max_age_s: int = 0
    stream_max_bytes: int = -1
    stream_replicas: int = 1
    stream_storage: str = "file"
    new_subscriptions_start: str = "all"
    log_level: str = "info"
    # The invoke and inbound ports' HTTP: "fast" (our own, over httptools) or "aiohttp" (the
    # framework's server and client, kept as the baseline the benchmarks compare with).
    http_engine: str = "fast"
    in_cluster: bool = False  # resolve unknown services through cluster DNS

    @property
    def auth_mode(self) -> str:
        if self.shared_token:
            return "token"
        if self.kube_api_url:
            return "tokenreview"
        return "none"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        subscribe = tuple(
            t.strip() for t in env.get("ACCORD_SUBSCRIBE", "").split(",") if t.strip()
        )
        for topic in subscribe:
            if not TOPIC.match(topic):
                raise ConfigError(f"ACCORD_SUBSCRIBE: {topic!r} is not a valid topic")
        app_port = _int(env, "ACCORD_APP_PORT", 0, 0, 65535) or None
        if subscribe and app_port is None:
            raise ConfigError("ACCORD_SUBSCRIBE needs ACCORD_APP_PORT to deliver events to")
        in_cluster = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
        sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
        allowed = tuple(
            a.strip()
            for a in env.get("ACCORD_ALLOWED_SERVICE_ACCOUNTS", "").split(",")
            if a.strip()
        )
        return cls(
            http_port=_int(env, "ACCORD_HTTP_PORT", 3500, 0, 65535),
            inbound_port=_int(env, "ACCORD_INBOUND_PORT", 3501, 0, 65535),
            admin_port=_int(env, "ACCORD_ADMIN_PORT", 9090, 0, 65535),
            bind_host=env.get("ACCORD_BIND_HOST", "0.0.0.0"),
            app_host=env.get("ACCORD_APP_HOST", "127.0.0.1"),
            app_port=app_port,
            app_id=env.get("ACCORD_APP_ID") or env.get("ACCORD_POD_NAME", "app").rsplit("-", 2)[0],
            namespace=env.get("ACCORD_POD_NAMESPACE", "default"),
            nats_url=env.get("ACCORD_NATS_URL", ""),
            subscribe=subscribe,
            max_deliveries=_int(env, "ACCORD_MAX_DELIVERIES", 5, 1, 1000),
            concurrency=_int(env, "ACCORD_CONCURRENCY", 1, 1, 1000),
            bulk_max=_int(env, "ACCORD_BULK_MAX", 1, 1, 1000),
            prefetch=_int(env, "ACCORD_PREFETCH", 256, 1, 10_000),
            partitions=_int(env, "ACCORD_PARTITIONS", 1, 1, 256),
            poison=_choice(env, "ACCORD_POISON", ("deadletter", "park")),
            reset_path=_path(env, "ACCORD_RESET_PATH"),
            redelivery_initial_ms=_int(env, "ACCORD_REDELIVERY_INITIAL_MS", 200, 0, 3_600_000),
            redelivery_max_ms=_int(env, "ACCORD_REDELIVERY_MAX_MS", 10_000, 0, 3_600_000),
            retry=RetryDefaults(
                max_attempts=_int(env, "ACCORD_RETRY_MAX_ATTEMPTS", 3, 1, 100),
                initial_ms=_int(env, "ACCORD_RETRY_INITIAL_MS", 100, 0, 3_600_000),
                max_ms=_int(env, "ACCORD_RETRY_MAX_MS", 2000, 0, 3_600_000),
                exponential=env.get("ACCORD_RETRY_BACKOFF", "exponential") != "constant",
            ),
            timeout_ms=_int(env, "ACCORD_TIMEOUT_MS", 10_000, 1, 3_600_000),
            retry_budget_percent=_int(env, "ACCORD_RETRY_BUDGET_PERCENT", 20, 0, 1000),
            breaker_failures=_int(env, "ACCORD_BREAKER_FAILURES", 5, 1, 10_000),
            breaker_cooldown_ms=_int(env, "ACCORD_BREAKER_COOLDOWN_MS", 5_000, 1, 3_600_000),
            services=_services(env.get("ACCORD_SERVICES", "")),
            targets=_targets(env.get("ACCORD_TARGETS", "")),
            max_body_bytes=_int(env, "ACCORD_MAX_BODY_BYTES", 1 << 20, 1, 1 << 30),
            data_dir=env.get("ACCORD_DATA_DIR", ""),
            dedup_max_entries=_int(env, "ACCORD_DEDUP_MAX_ENTRIES", 10_000, 1, 10_000_000),
            dedup_ttl_s=_int(env, "ACCORD_DEDUP_TTL_S", 3600, 1, 30 * 86400),
            journal_retention_s=_int(env, "ACCORD_JOURNAL_RETENTION_S", 7 * 86400, 60, 365 * 86400),
            journal_max_entries=_int(env, "ACCORD_JOURNAL_MAX_ENTRIES", 100_000, 1, 10_000_000),
            tpc_outcome_after_s=_int(env, wire.SidecarEnv.TPC_OUTCOME_AFTER_S, 60, 1, 86400),
            shared_token=env.get("ACCORD_SHARED_TOKEN", ""),
            allowed_service_accounts=allowed,
            kube_api_url=env.get(
                "ACCORD_KUBE_API_URL", "https://kubernetes.default.svc" if in_cluster else ""
            ),
            kube_ca_file=env.get("ACCORD_KUBE_CA_FILE", f"{sa_dir}/ca.crt" if in_cluster else ""),
            kube_token_file=env.get(
                "ACCORD_KUBE_TOKEN_FILE", f"{sa_dir}/token" if in_cluster else ""
            ),
            kube_client_cert=env.get("ACCORD_KUBE_CLIENT_CERT", ""),
            kube_client_key=env.get("ACCORD_KUBE_CLIENT_KEY", ""),
            token_audience=env.get("ACCORD_TOKEN_AUDIENCE", "") or wire.PARTICIPANT_AUDIENCE,
            shutdown_grace_s=_int(env, "ACCORD_SHUTDOWN_GRACE_S", 20, 0, 3600),
            header_timeout_s=_int(env, "ACCORD_HEADER_TIMEOUT_S", 30, 1, 3600),
            body_timeout_s=_int(env, "ACCORD_BODY_TIMEOUT_S", 60, 1, 3600),
            stream_max_age_s=int(_broker(env, wire.SidecarEnv.STREAM_MAX_AGE_S, "0")),
            stream_max_bytes=int(_broker(env, wire.SidecarEnv.STREAM_MAX_BYTES, "-1")),
            stream_replicas=int(_broker(env, wire.SidecarEnv.STREAM_REPLICAS, "1")),
            stream_storage=_broker(env, wire.SidecarEnv.STREAM_STORAGE, "file"),
            new_subscriptions_start=_broker(env, wire.SidecarEnv.NEW_SUBSCRIPTIONS_START, "all"),
            log_level=env.get("ACCORD_LOG_LEVEL", "info").lower(),
            http_engine=_choice(env, "ACCORD_HTTP_ENGINE", ("fast", "aiohttp")),
            in_cluster=in_cluster or "ACCORD_POD_NAMESPACE" in env,
        )
