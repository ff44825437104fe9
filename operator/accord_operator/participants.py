"""Calling participant services: resolve a Service, POST JSON, classify the answer.

Shared by the saga and two-phase-commit reconcilers. Wire contract (DESIGN.md): 2xx done;
4xx other than 408/409/429 is a business refusal (not retried); 5xx, 408, 409, 429, a
timeout or a connection error is retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

import accord_wire as wire
from accord_operator.kubeapi import ApiError, KubeApi

_CACHE_TTL_S = 5.0
# The API server's minimum; renewed when less than a fifth of it is left.
_TOKEN_LIFETIME_S = 600


@dataclass(frozen=True)
class Answer:
    ok: bool
    retryable: bool
    unknown: bool  # the request may have reached the participant
    status: int
    body: Any
    error: str
    replayed: bool = False  # the participant's sidecar answered from its store


class ServiceNotFound(Exception):
    pass


class AudienceToken:
    """A short-lived token of the operator's service account for one audience (TokenRequest).

    What participants receive instead of the operator's own API token: the API server
    refuses it (its audience is not the API server's), and a participant's sidecar accepts it
    only with TokenReview for this audience. So a participant, or whatever host a Service
    names, can do nothing with it but recognise the operator.
    """

    def __init__(self, api: KubeApi, namespace: str, service_account: str, audience: str) -> None:
        self.api = api
        self.path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        self.audience = audience
        self._token = ""
        self._renew_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        if time.monotonic() < self._renew_at:
            return self._token
        async with self._lock:
            if time.monotonic() >= self._renew_at:
                request = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": [self.audience], "expirationSeconds": _TOKEN_LIFETIME_S},
                }
                answer = await self.api.request("POST", self.path, request)
                self._token = answer["status"]["token"]
                self._renew_at = time.monotonic() + _TOKEN_LIFETIME_S * 0.8
        return self._token


class Participants:
    def __init__(
        self, api: KubeApi, token: str = "", audience_token: AudienceToken | None = None
    ) -> None:
        """token: a shared bearer token (local runs); audience_token: in a cluster. Never
        the operator's own API token: that one is only ever sent to the API server."""
        self.api = api
        self.token = token
        self.audience_token = audience_token
        self._session: aiohttp.ClientSession | None = None
        self._services: dict[tuple[str, str, int], tuple[float, str]] = {}
        self._lookups: dict[tuple[str, str, int], asyncio.Future[str]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def base_url(self, namespace: str, service: str, port: int) -> str:
        """ClusterIP -> name.namespace.svc:port; ExternalName -> externalName:port. Cached
        for a few seconds; callers that miss at once share one lookup (a busy operator sent
        one GET per call when the entry ran out)."""
        key = (namespace, service, port)
        cached = self._services.get(key)
        if cached and time.monotonic() - cached[0] < _CACHE_TTL_S:
            return cached[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup(key))
            self._lookups[key] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(key, None))
        return await asyncio.shield(lookup)

    async def _lookup(self, key: tuple[str, str, int]) -> str:
        namespace, service, port = key
        try:
            svc = await self.api.get(f"/api/v1/namespaces/{namespace}/services/{service}")
        except ApiError as exc:
            if exc.status == 404:
                raise ServiceNotFound(f"Service {namespace}/{service} not found") from None
            raise
        spec = svc.get("spec") or {}
        host = (
            spec["externalName"]
            if spec.get("type") == "ExternalName"
            else f"{service}.{namespace}.svc"
        )
        url = f"http://{host}:{port}"
        self._services[key] = (time.monotonic(), url)
        return url

    async def _auth(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.audience_token is not None:
            return {"Authorization": f"Bearer {await self.audience_token.get()}"}
        return {}

    async def call(
        self,
        url: str,
        payload: Any,
        headers: dict[str, str],
        timeout_s: float,
        method: str = "POST",
    ) -> Answer:
        try:
            auth = await self._auth()
        except ApiError as exc:
            # Not the participant's fault, and nothing was sent: retried, never unknown.
            return Answer(False, True, False, 0, None, f"no participant token: {exc}")
        try:
            async with self.session.request(
                method,
                url,
                data=json.dumps(payload),
                allow_redirects=False,
                headers={"Content-Type": "application/json", **auth, **headers},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as r:
                raw = await r.read()
                replayed = r.headers.get(wire.REPLAYED, "").lower() == "true"
        except TimeoutError:
            return Answer(False, True, True, 0, None, f"no answer within {timeout_s:g}s from {url}")
        except aiohttp.ClientConnectorError as exc:
            # Never connected: the request cannot have reached the participant.
            return Answer(
                False, True, False, 0, None, f"cannot connect to {url}: {exc.os_error or exc}"
            )
        except aiohttp.ClientError as exc:
            return Answer(False, True, True, 0, None, f"{url}: {exc or type(exc).__name__}")
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = raw.decode(errors="replace")
        if 200 <= r.status < 300:
            return Answer(True, False, False, r.status, body, "", replayed)
        text = body if isinstance(body, str) else json.dumps(body)
        retryable = wire.try_again(r.status)
        error = f"HTTP {r.status}: {text[:500]}" + (" (replayed)" if replayed else "")
        return Answer(False, retryable, False, r.status, body, error, replayed)
