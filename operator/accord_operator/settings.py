"""Operator settings, read once from the environment (ACCORD_*). The one settings object."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from accord_wire import PARTICIPANT_AUDIENCE, SidecarEnv, check_broker_setting


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"{name}={raw!r} is not a port number (0-65535)")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, choices[0]).strip().lower() or choices[0]
    if raw not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


# The audience of the tokens participants receive (the sidecar checks it; DESIGN.md).


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"
    nats_url: str = "nats://127.0.0.1:4222"
    sidecar_image: str = "accord/sidecar:0.1.0"
    webhook_port: int = 9443
    webhook_cert_dir: str = ""  # holds tls.crt and tls.key; empty: a self-signed pair
    operator_namespace: str = ""  # never injected
    native_sidecars: str = "auto"  # auto (from the cluster version), true or false
    participant_token: str = ""  # bearer token for participants' sidecars (local runs)
    # In a cluster: participants get a token of this service account for this audience.
    service_account: str = ""
    participant_audience: str = PARTICIPANT_AUDIENCE
    # One active controller among replicas: a Lease in operator_namespace (the chart sets it).
    leader_election: bool = False
    identity: str = ""  # who holds the lease: the pod's name, else host and pid
    # The broker settings every sidecar gets (SidecarEnv.BROKER), as set in our own env.
    broker_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        namespaces = tuple(
            ns.strip() for ns in env.get("ACCORD_NAMESPACES", "").split(",") if ns.strip()
        )
        return cls(
            namespaces=namespaces,
            metrics_port=_int(env, "ACCORD_METRICS_PORT", 8080),
            metrics_host=env.get("ACCORD_METRICS_HOST", "0.0.0.0"),
            nats_url=env.get("ACCORD_NATS_URL", "nats://127.0.0.1:4222"),
            sidecar_image=env.get("ACCORD_SIDECAR_IMAGE", "accord/sidecar:0.1.0"),
            webhook_port=_int(env, "ACCORD_WEBHOOK_PORT", 9443),
            webhook_cert_dir=env.get("ACCORD_WEBHOOK_CERT_DIR", ""),
            operator_namespace=env.get("ACCORD_OPERATOR_NAMESPACE", env.get("POD_NAMESPACE", "")),
            native_sidecars=_choice(env, "ACCORD_NATIVE_SIDECARS", ("auto", "true", "false")),
            participant_token=env.get("ACCORD_PARTICIPANT_TOKEN", ""),
            service_account=env.get("ACCORD_SERVICE_ACCOUNT", ""),
            leader_election=_choice(env, "ACCORD_LEADER_ELECTION", ("false", "true")) == "true",
            identity=env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            participant_audience=env.get("ACCORD_PARTICIPANT_AUDIENCE", "") or PARTICIPANT_AUDIENCE,
            broker_env=tuple(
                (name, check_broker_setting(name, env[name]))
                for name in SidecarEnv.BROKER
                if env.get(name, "").strip()
            ),
        )
