"""Outbound invocation (POST /v1/invoke/<service>/<path>) with retries, a circuit breaker
and a retry budget per target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

import accord_wire as wire
from accord_sidecar import metrics
from accord_sidecar.config import SERVICE, Config
from accord_sidecar.errors import error, read_body
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


@dataclass
class Target:
    name: str
    breaker: CircuitBreaker
    budget: RetryBudget
    policy: RetryPolicy
    timeout_s: float
    timeout: aiohttp.ClientTimeout = field(init=False)
    label: str = field(init=False)  # its metrics' label: its name if configured, else "other"
    latency: Any = field(init=False)  # the metric children, looked up once per target

    def __post_init__(self) -> None:
        self.timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self.label = metrics.target_label(self.name)
        self.latency = metrics.OUTBOUND_LATENCY.labels(self.label)


MAX_TARGETS = 1024  # breakers and budgets kept; the least recently added go first


class Invoker:
    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # The raw target, never the decoded one: %2F, %3F and %252e reach the target as sent.
        service, _, rest = request.raw_path[len(PREFIX) :].partition("/")
        if not SERVICE.match(service) or len(service) > 253:
            return error(
                400,
                "invalid_service",
                f"{service!r} is not a service name (name[.namespace][:port])",
            )
        body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
        if isinstance(body, web.Response):
            return body
        base = self.resolve(service)
        if base is None:
            return error(404, "unknown_service", f"{service!r} is not in ACCORD_SERVICES")
        url = URL(f"{base}/{rest}", encoded=True)
        headers = forward_headers(request.headers)
        target = self.target(service)
        started = time.perf_counter()
        response = await self._call(service, target, request.method, url, headers, body)
        target.latency.observe(time.perf_counter() - started)
        metrics.OUTBOUND_REQUESTS.labels(target.label, str(response.status)).inc()
        if target.label != metrics.OTHER:
            metrics.BREAKER_STATE.labels(target.label).set(target.breaker.state.value)
        return response

    async def _call(
        self,
        service: str,
        target: Target,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> web.Response:
        if not target.breaker.allow():
            metrics.BREAKER_REJECTED.labels(target.label).inc()
            return error(
                503, "circuit_open", f"circuit breaker for {service} is open; failing fast"
            )
        target.budget.record_request()
        retry_allowed = may_retry_request(method, headers)
        attempt = 1
        while True:
            status, resp_headers, resp_body, failure = await self._attempt(
                target, method, url, headers, body
            )
            ok = failure is None and not retryable_status(status)
            target.breaker.record(ok)
            if ok or attempt >= target.policy.max_attempts or not retry_allowed:
                break
            if not target.budget.try_spend():
                metrics.RETRIES_DENIED.labels(target.label).inc()
                break
            delay = (
                retry_after_seconds(resp_headers.get("Retry-After")) if failure is None else None
            )
            if delay is None:
                delay = target.policy.delay(attempt)
            if delay > target.policy.max_s and failure is None:
                break  # the target asked for longer than we may wait: give it its answer
            await asyncio.sleep(delay)
            if not target.breaker.allow():
                metrics.BREAKER_REJECTED.labels(target.label).inc()
                break
            metrics.RETRIES.labels(target.label).inc()
            attempt += 1
        if failure is not None:
            code, message = failure
            return error(504 if code == "timeout" else 502, code, f"{service}: {message}")
        out = web.Response(status=status, body=resp_body, headers=forward_headers(resp_headers))
        out.headers[wire.ATTEMPTS] = str(attempt)
        return out

    async def _attempt(
        self, target: Target, method: str, url: URL, headers: CIMultiDict[str], body: bytes
    ) -> tuple[int, CIMultiDict[str], bytes, tuple[str, str] | None]:
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=target.timeout,
            ) as r:
                return r.status, CIMultiDict(r.headers), await r.read(), None
        except TimeoutError:
            return 0, CIMultiDict(), b"", ("timeout", f"no answer within {target.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return 0, CIMultiDict(), b"", ("unreachable", str(exc) or type(exc).__name__)
