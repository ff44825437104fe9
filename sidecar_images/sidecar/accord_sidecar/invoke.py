"""Outbound invocation (POST /v1/invoke/<service>/<path>) with retries, a circuit breaker
and a retry budget per target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

import accord_wire as wire
from accord_sidecar import metrics
from accord_sidecar.config import SERVICE, Config
from accord_sidecar.errors import error, read_body
from accord_sidecar.fasthttp import BodyStream, Pool, Reply, Upstream, UpstreamError
from accord_sidecar.resiliency import (
    CircuitBreaker,
    RetryBudget,
    RetryPolicy,
    may_retry_request,
    retry_after_seconds,
    retryable_status,
)

PREFIX = "/v1/invoke/"

# Never forwarded: they describe one hop, not the request (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def forward_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Every header but the hop-by-hop ones, repeated headers (Set-Cookie) kept."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


def forward_list(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """forward_headers, as a list."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def upstream_of(pool: Pool | None, base: str) -> tuple[Upstream, str] | None:
    """The pooled upstream for a plain-HTTP base URL, and the path prefix it carries (None:
    another scheme, left to aiohttp's client)."""
    if pool is None:
        return None
    url = urlsplit(base)
    if url.scheme != "http" or not url.hostname:
        return None
    return pool.get(url.hostname, url.port or 80), url.path.rstrip("/")


@dataclass
class Target:
    name: str
    breaker: CircuitBreaker
    budget: RetryBudget
    policy: RetryPolicy
    timeout_s: float
    label: str = field(init=False)  # its metrics' label: its name if configured, else "other"
    latency: Any = field(init=False)  # the metric children, looked up once per target
    counted: dict[int, Any] = field(init=False)  # OUTBOUND_REQUESTS' children, by status
    breaker_gauge: Any = field(init=False)  # BREAKER_STATE's child (configured targets only)
    base: str = ""  # where it was last resolved to, and the upstream that goes with it
    upstream: tuple[Upstream, str] | None = None

    def __post_init__(self) -> None:
        self.label = metrics.target_label(self.name)
        self.latency = metrics.OUTBOUND_LATENCY.labels(self.label)
        self.counted = {}
        self.breaker_gauge = (
            metrics.BREAKER_STATE.labels(self.label) if self.label != metrics.OTHER else None
        )

    def count(self, status: int) -> None:
        child = self.counted.get(status)
        if child is None:
            child = self.counted[status] = metrics.OUTBOUND_REQUESTS.labels(self.label, str(status))
        child.inc()


MAX_TARGETS = 1024  # breakers and budgets kept; the least recently added go first


class Invoker:
    """`pool`: our own keep-alive client for plain-HTTP targets (None: aiohttp's client for
    all, as the baseline ACCORD_HTTP_ENGINE=aiohttp does)."""

    def __init__(self, config: Config, session: Any, pool: Pool | None = None) -> None:
        self.config = config
        self.session = session
        self.pool = pool
        self.targets: dict[str, Target] = {}

    def resolve(self, service: str) -> str | None:
        """Local map first (ACCORD_SERVICES), else cluster DNS to the target's sidecar.

        Outside a cluster an unmapped name is unknown: no DNS lookup leaves the machine.
        """
        name, _, port = service.partition(":")
        if service in self.config.services:
            return self.config.services[service]
        if name in self.config.services:
            return self.config.services[name]
        if not self.config.in_cluster:
            return None
        host = name if "." in name else f"{name}.{self.config.namespace}.svc"
        return f"http://{host}:{port or 3501}"

    def target(self, service: str) -> Target:
        t = self.targets.get(service)
        if t is None:
            c, r = self.config, self.config.retry
            o = c.targets.get(service) or c.targets.get(service.partition(":")[0]) or {}
            t = Target(
                name=service,
                breaker=CircuitBreaker(
                    o.get("breakerFailures", c.breaker_failures),
                    o.get("breakerCooldownMs", c.breaker_cooldown_ms) / 1000,
                ),
                budget=RetryBudget(o.get("retryBudgetPercent", c.retry_budget_percent)),
                policy=RetryPolicy(
                    o.get("maxAttempts", r.max_attempts),
                    o.get("initialMs", r.initial_ms) / 1000,
                    o.get("maxMs", r.max_ms) / 1000,
                    r.exponential,
                ),
                timeout_s=o.get("timeoutMs", c.timeout_ms) / 1000,
            )
            if len(self.targets) >= MAX_TARGETS:
                del self.targets[next(iter(self.targets))]
            self.targets[service] = t
        return t

    async def handle(self, request: Any) -> Reply:
        # The raw target, never the decoded one: %2F, %3F and %252e reach the target as sent.
        service, _, rest = request.raw_path[len(PREFIX) :].partition("/")
        if not SERVICE.match(service) or len(service) > 253:
            return error(
                400,
                "invalid_service",
                f"{service!r} is not a service name (name[.namespace][:port])",
            )
        body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
        if isinstance(body, Reply):
            return body
        base = self.resolve(service)
        if base is None:
            return error(404, "unknown_service", f"{service!r} is not in ACCORD_SERVICES")
        target = self.target(service)
        if target.base != base:
            target.base, target.upstream = base, upstream_of(self.pool, base)
        started = time.perf_counter()
        response = await self._call(
            service, target, request.method, f"{base}/{rest}", rest,
            request.headers, body,
        )  # fmt: skip
        target.latency.observe(time.perf_counter() - started)
        target.count(response.status)
        if target.breaker_gauge is not None:
            target.breaker_gauge.set(target.breaker.state.value)
        return response

    async def _call(
        self,
        service: str,
        target: Target,
        method: str,
        url: str,
        rest: str,
        received: CIMultiDict[str],
        body: bytes,
    ) -> Reply:
        headers = forward_list(received.items())
        if not target.breaker.allow():
            metrics.BREAKER_REJECTED.labels(target.label).inc()
            return error(
                503, "circuit_open", f"circuit breaker for {service} is open; failing fast"
            )
        target.budget.record_request()
        retry_allowed = may_retry_request(method, received)
        attempt = 1
        while True:
            status, resp_headers, resp_body, failure = await self._attempt(
                target, method, url, rest, headers, body, retry_allowed
            )
            ok = failure is None and not retryable_status(status)
            target.breaker.record(ok)
            if ok or attempt >= target.policy.max_attempts or not retry_allowed:
                break
            if not target.budget.try_spend():
                metrics.RETRIES_DENIED.labels(target.label).inc()
                break
            delay = (
                retry_after_seconds(_header(resp_headers, "retry-after"))
                if failure is None
                else None
            )
            if delay is None:
                delay = target.policy.delay(attempt)
            if delay > target.policy.max_s and failure is None:
                break  # the target asked for longer than we may wait: give it its answer
            await asyncio.sleep(delay)
            if not target.breaker.allow():
                metrics.BREAKER_REJECTED.labels(target.label).inc()
                break
            if isinstance(resp_body, BodyStream):
                resp_body.discard()  # an answer not given: its connection is not reused
            metrics.RETRIES.labels(target.label).inc()
            attempt += 1
        if failure is not None:
            code, message = failure
            return error(504 if code == "timeout" else 502, code, f"{service}: {message}")
        out = forward_list(resp_headers)
        out.append((wire.ATTEMPTS, str(attempt)))
        return Reply(status, out, resp_body)

    async def _attempt(
        self,
        target: Target,
        method: str,
        url: str,
        rest: str,
        headers: list[tuple[str, str]],
        body: bytes,
        replayable: bool,
    ) -> tuple[int, list[tuple[str, str]], bytes | BodyStream, tuple[str, str] | None]:
        if target.upstream is not None:
            upstream, prefix = target.upstream
            try:
                status, answer, data = await upstream.request(
                    method, f"{prefix}/{rest}", headers, body, target.timeout_s, replayable,
                    stream=True,  # a big answer goes on to the caller as it arrives
                )  # fmt: skip
            except UpstreamError as exc:
                return 0, [], b"", (exc.code, str(exc))
            return status, answer, data, None
        import aiohttp  # HTTPS targets, or the baseline engine: aiohttp's client
        from yarl import URL

        try:
            async with self.session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=target.timeout_s),
            ) as r:
                return r.status, list(r.headers.items()), await r.read(), None
        except TimeoutError:
            return 0, [], b"", ("timeout", f"no answer within {target.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return 0, [], b"", ("unreachable", str(exc) or type(exc).__name__)


def _header(headers: list[tuple[str, str]], lower_name: str) -> str | None:
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None
