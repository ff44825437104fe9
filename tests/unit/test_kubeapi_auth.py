"""The operator's API client carries the service-account token in a cluster (it once sent
none, and ran as system:anonymous), with the kubernetes client pip installed."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client
from kubernetes.config.incluster_config import InClusterConfigLoader

from accord_operator.kubeapi import bearer_header


def in_cluster_config(tmp_path: Path, token: str) -> client.Configuration:
    (tmp_path / "token").write_text(token)
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = client.Configuration()
    InClusterConfigLoader(
        token_filename=str(tmp_path / "token"),
        cert_filename=str(tmp_path / "ca.crt"),
        environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    ).load_and_set(cfg)
    return cfg


def test_in_cluster_token_is_sent_as_bearer(tmp_path: Path) -> None:
    cfg = in_cluster_config(tmp_path, "the-sa-token")
    assert bearer_header(cfg) == {"Authorization": "bearer the-sa-token"}


def test_a_rotated_token_is_read_again_when_due(tmp_path: Path) -> None:
    cfg = in_cluster_config(tmp_path, "first")
    (tmp_path / "token").write_text("second")
    loader_hook = cfg.refresh_api_key_hook
    assert loader_hook is not None
    # Force the refresh period to be over, as a minute of wall time would.
    loader = loader_hook.__closure__[0].cell_contents  # type: ignore[union-attr]
    loader.token_expires_at = loader.token_expires_at.min
    assert bearer_header(cfg) == {"Authorization": "bearer second"}


def test_no_credentials_no_header() -> None:
    assert bearer_header(client.Configuration()) == {}
