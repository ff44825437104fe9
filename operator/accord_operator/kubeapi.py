"""A small asyncio client for the Kubernetes API, for the reconcilers' own reads and
writes (status patches, Services, Pods): aiohttp on the same credentials as the kubernetes
client (in-cluster service account, else the kubeconfig)."""

from __future__ import annotations

import os
import ssl
from typing import Any

import aiohttp
from kubernetes import client, config


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


def bearer_header(cfg: client.Configuration) -> dict[str, str]:
    """The Authorization header the kubernetes client itself would send.

    Asked through auth_settings(), not a key of api_key: the client renamed that key
    ("authorization" until v35, "BearerToken" since v36), and reading the old name sent no
    token at all in a cluster, so every request ran as system:anonymous.
    """
    # In a cluster the token file rotates; the refresh hook re-reads it when due.
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)
    setting = cfg.auth_settings().get("BearerToken") or {}
    value = setting.get("value")
    return {"Authorization": str(value)} if value else {}


class KubeApi:
    def __init__(self, kubeconfig: str | None = None) -> None:
        """In-cluster credentials, else kubeconfig (default: $KUBECONFIG, read now: the
        client reads it once, at import)."""
        cfg = client.Configuration()
        try:
            if kubeconfig:
                raise config.ConfigException("a kubeconfig was given")
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(
                config_file=kubeconfig or os.environ.get("KUBECONFIG") or None,
                client_configuration=cfg,
            )
        self.host = cfg.host.rstrip("/")
        ctx = (
            ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.verify_ssl
            else ssl.create_default_context()
        )
        if not cfg.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        self._ssl = ctx
        self._cfg = cfg
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        return bearer_header(self._cfg)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        headers = {**self._headers(), "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(method, self.host + path, json=body, headers=headers) as r:
            data = await r.json(content_type=None) if r.content_length != 0 else None
            if r.status >= 400:
                raise ApiError(r.status, data)
            return data

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
