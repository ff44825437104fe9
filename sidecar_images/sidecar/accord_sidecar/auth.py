"""Who may call the inbound port: a shared token (local runs) or a Kubernetes
service-account token for the participant audience, checked with TokenReview (cached),
against an allow-list."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

from accord_sidecar.config import Config
from accord_sidecar.kube import KubeAccess

_CACHE_TTL_S = 60.0


@dataclass(frozen=True)
class Verdict:
    status: int  # 200 allowed, 401 not authenticated, 403 not allowed
    message: str
    identity: str = ""


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def allowed(identity: str, allow_list: tuple[str, ...]) -> bool:
    """identity is system:serviceaccount:<ns>:<name>; entries are ns/name, ns/* or the full name."""
    if not allow_list:
        return True
    parts = identity.split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        return False
    ns, name = parts[2], parts[3]
    return any(e in (f"{ns}/{name}", f"{ns}/*", identity) for e in allow_list)


class Authenticator:
    def __init__(self, config: Config, session: Any = None) -> None:
        self.config = config
        self.session = session
        self._cache: dict[str, tuple[float, Verdict]] = {}
        self.kube = KubeAccess(config)

    async def check(self, authorization: str | None) -> Verdict:
        token = _bearer(authorization)
        mode = self.config.auth_mode
        if mode == "none":
            return Verdict(
                401, "inbound authentication is not configured (ACCORD_SHARED_TOKEN or TokenReview)"
            )
        if token is None:
            return Verdict(401, "missing bearer token")
        if mode == "token":
            if hmac.compare_digest(token.encode(), self.config.shared_token.encode()):
                return Verdict(200, "ok", "shared-token")
            return Verdict(401, "invalid token")
        return await self._token_review(token)

    async def _token_review(self, token: str) -> Verdict:
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached[0] < _CACHE_TTL_S:
            return cached[1]
        verdict = await self._review(token)
        if verdict.status in (200, 401, 403):  # do not cache API failures
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (time.monotonic(), verdict)
        return verdict

    async def _review(self, token: str) -> Verdict:
        assert self.session is not None
        c = self.config
        headers = self.kube.headers()
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [c.token_audience]},
        }
        import aiohttp  # HTTPS to the API server: aiohttp's client

        try:
            async with self.session.post(
                f"{c.kube_api_url}/apis/authentication.k8s.io/v1/tokenreviews",
                json=review,
                headers=headers,
                ssl=self.kube.context(),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as r:
                if r.status == 403:
                    return Verdict(
                        503,
                        "this sidecar may not check tokens: its service account needs "
                        "system:auth-delegator (TokenReview)",
                    )
                if r.status != 201 and r.status != 200:
                    return Verdict(503, f"TokenReview failed with HTTP {r.status}")
                status = (await r.json()).get("status") or {}
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Verdict(503, f"TokenReview unavailable: {exc or type(exc).__name__}")
        if not status.get("authenticated"):
            return Verdict(401, f"token not authenticated for audience {c.token_audience}")
        if c.token_audience not in (status.get("audiences") or []):
            return Verdict(401, f"token is not for audience {c.token_audience}")
        identity = (status.get("user") or {}).get("username", "")
        if not allowed(identity, c.allowed_service_accounts):
            return Verdict(403, f"{identity} is not allowed to call this service")
        return Verdict(200, "ok", identity)
