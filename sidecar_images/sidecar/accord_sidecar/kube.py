"""The sidecar's own way to the Kubernetes API: its service account (token re-read on every
call: kubelet rotates it), the cluster's CA. Used for TokenReview and to read a
transaction's outcome."""

from __future__ import annotations

import ssl
from pathlib import Path

from accord_sidecar.config import Config


class KubeAccess:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._ssl: ssl.SSLContext | None = None

    @property
    def configured(self) -> bool:
        return bool(self.config.kube_api_url)

    def context(self) -> ssl.SSLContext:
        if self._ssl is None:
            c = self.config
            self._ssl = ssl.create_default_context(cafile=c.kube_ca_file or None)
            if c.kube_client_cert:
                self._ssl.load_cert_chain(c.kube_client_cert, c.kube_client_key or None)
        return self._ssl

    def headers(self) -> dict[str, str]:
        if not self.config.kube_token_file:
            return {}
        return {"Authorization": f"Bearer {Path(self.config.kube_token_file).read_text().strip()}"}
