"""Pod in, JSON patch out: whether to inject the sidecar, and the patch that does it (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from accord_operator.injector.config import (
    INJECT,
    SIDECAR_NAME,
    STATUS,
    AnnotationError,
    SidecarConfig,
    parse,
    status_annotation,
)
from accord_wire import AppEnv
from accord_wire import SidecarEnv as Env

JsonPatch = list[dict[str, Any]]
Pod = Mapping[str, Any]

NEVER_INJECTED: Final = frozenset({"kube-system", "kube-public", "kube-node-lease"})
VOLUME: Final = "accord-sidecar-data"
DATA_DIR: Final = "/var/run/accord"


@dataclass(frozen=True)
class Injector:
    """What the operator's settings contribute to every injection."""

    image: str
    version: str
    nats_url: str
    native_by_default: bool  # from the cluster version: native sidecars need >= 1.29
    operator_namespace: str = ""
    token_audience: str = "accord.dev/participant"  # what the inbound port accepts
    broker_env: tuple[tuple[str, str], ...] = ()  # stream settings, the same for every sidecar


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str


def has_sidecar(pod: Pod) -> bool:
    spec = pod.get("spec") or {}
    return any(
        c.get("name") == SIDECAR_NAME
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    )


def decide(
    pod: Pod, *, namespace: str, namespace_enabled: bool, operator_namespace: str = ""
) -> Decision:
    """Whether this pod gets the sidecar. AnnotationError if accord.dev/inject is malformed."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    asked = annotations.get(INJECT)
    if asked is not None and asked.strip().lower() not in ("true", "false"):
        raise AnnotationError(f'{INJECT}: {asked!r} must be "true" or "false"')
    if has_sidecar(pod):
        return Decision(False, "already has the sidecar")
    if namespace in NEVER_INJECTED or (operator_namespace and namespace == operator_namespace):
        return Decision(False, f"namespace {namespace} is never injected")
    if (pod.get("spec") or {}).get("hostNetwork"):
        return Decision(False, "hostNetwork pods are never injected")
    if asked is not None and asked.strip().lower() == "false":
        return Decision(False, f"opted out with {INJECT}=false")
    if asked is not None:
        return Decision(True, f"{INJECT}=true")
    if namespace_enabled:
        return Decision(True, f"namespace {namespace} has accord.dev/injection=enabled")
    return Decision(False, "injection not asked for")


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def app_id(pod: Pod) -> str:
    """The app's name: durable subscriptions and event sources are named after it, so every
    replica of a Deployment shares one consumer."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    for key in ("app.kubernetes.io/name", "app"):
        if labels.get(key):
            return str(labels[key])
    generate = str(meta.get("generateName") or "").rstrip("-")
    if generate:
        # A Deployment's pods are "<deployment>-<hash>-": drop the ReplicaSet hash.
        head, _, tail = generate.rpartition("-")
        return head if head and tail.isalnum() and len(tail) in (9, 10) else generate
    return str(meta.get("name") or "app")


def sidecar_container(
    injector: Injector, config: SidecarConfig, *, native: bool, app: str = "app"
) -> dict[str, Any]:
    ports = config.ports
    env: list[dict[str, Any]] = [
        {"name": Env.APP_ID, "value": app},
        {"name": Env.HTTP_PORT, "value": str(ports.http)},
        {"name": Env.INBOUND_PORT, "value": str(ports.inbound)},
        {"name": Env.ADMIN_PORT, "value": str(ports.admin)},
        {"name": Env.NATS_URL, "value": injector.nats_url},
        {"name": Env.LOG_LEVEL, "value": config.log_level},
        {"name": Env.DATA_DIR, "value": DATA_DIR},
        {
            "name": Env.POD_NAMESPACE,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
        # Always set, empty when there is no app port: a Service named accord-app in the
        # pod's namespace would otherwise hand the sidecar ACCORD_APP_PORT=tcp://... (the
        # kubelet's service links; the pod's own env wins over them).
        {"name": Env.APP_PORT, "value": str(config.app_port or "")},
        {"name": Env.TOKEN_AUDIENCE, "value": injector.token_audience},
    ]
    optional = {
        Env.SUBSCRIBE: ",".join(config.subscribe) or None,
        Env.RETRY_MAX_ATTEMPTS: config.retry_max_attempts,
        Env.RETRY_INITIAL_MS: config.retry_initial_ms,
        Env.RETRY_MAX_MS: config.retry_max_ms,
        Env.TIMEOUT_MS: config.timeout_ms,
        Env.TARGETS: config.target_policies,
        Env.CONCURRENCY: config.subscribe_concurrency,
        Env.BULK_MAX: config.subscribe_bulk,
        Env.PARTITIONS: config.subscribe_partitions,
        Env.POISON: config.subscribe_poison,
        Env.RESET_PATH: config.subscribe_reset,
        Env.MAX_DELIVERIES: config.max_deliveries,
        Env.TPC_OUTCOME_AFTER_S: config.tpc_outcome_after_s,
        Env.NEW_SUBSCRIPTIONS_START: config.subscribe_start,
    }
    env += [{"name": k, "value": str(v)} for k, v in optional.items() if v is not None]
    # The cluster's broker settings, where the pod did not ask for its own.
    env += [{"name": k, "value": v} for k, v in injector.broker_env if k not in optional
            or optional[k] is None]  # fmt: skip

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": ports.admin},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        }

    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": injector.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "ports": [
            {"name": "accord-inbound", "containerPort": ports.inbound, "protocol": "TCP"},
            {"name": "accord-metrics", "containerPort": ports.admin, "protocol": "TCP"},
        ],
        "resources": {k: dict(v) for k, v in config.resources.items()},
        # Meets the `restricted` Pod Security Standard on its own.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "livenessProbe": probe("/healthz", 10, 3),
        "readinessProbe": probe("/readyz", 5, 3),
        "volumeMounts": [{"name": VOLUME, "mountPath": DATA_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if native:
        # A native sidecar: the kubelet starts app containers only once the startup probe
        # passes, and it does not keep a Job's pod from completing.
        container["restartPolicy"] = "Always"
        # The sidecar's own health, not /readyz: readiness includes the app's port, and the
        # app container does not start until this probe passes (a deadlock on a real kubelet).
        container["startupProbe"] = probe("/healthz", 1, 120)
    return container


def _app_env(config: SidecarConfig) -> list[dict[str, Any]]:
    return [
        {"name": AppEnv.HTTP_PORT, "value": str(config.ports.http)},
        {"name": AppEnv.SIDECAR_URL, "value": f"http://127.0.0.1:{config.ports.http}"},
    ]


def _check_port_conflicts(pod: Pod, config: SidecarConfig) -> None:
    taken = {
        config.ports.http: "http-port",
        config.ports.inbound: "inbound-port",
        config.ports.admin: "admin-port",
    }
    spec = pod.get("spec") or {}
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for p in c.get("ports") or []:
            port = p.get("containerPort")
            if port in taken:
                raise AnnotationError(
                    f"container {c.get('name')!r} uses port {port}, which the sidecar needs; "
                    f"move the sidecar with accord.dev/{taken[port]}"
                )


def build_patch(pod: Pod, injector: Injector) -> JsonPatch:
    """The JSON patch that injects the sidecar into pod. AnnotationError on bad annotations.

    Valid whether containers, initContainers, volumes, annotations or env are absent or not.
    The caller decides first; a pod that already has the sidecar gets an empty patch.
    """
    if has_sidecar(pod):
        return []
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    config = parse(annotations)
    _check_port_conflicts(pod, config)
    native = injector.native_by_default if config.native is None else config.native
    spec = pod.get("spec") or {}
    ops: JsonPatch = []

    # App env first, at the containers' original indices (the insertion below shifts them).
    groups = ["containers", "initContainers"] if native else ["containers"]
    for group in groups:
        for i, container in enumerate(spec.get(group) or []):
            existing = {e.get("name") for e in container.get("env") or []}
            wanted = [e for e in _app_env(config) if e["name"] not in existing]
            if not wanted:
                continue
            if container.get("env") is None:
                ops.append({"op": "add", "path": f"/spec/{group}/{i}/env", "value": wanted})
            else:
                ops += [
                    {"op": "add", "path": f"/spec/{group}/{i}/env/-", "value": e} for e in wanted
                ]

    sidecar = sidecar_container(injector, config, native=native, app=app_id(pod))
    if native:
        # First init container: it is up before any other init container or app starts.
        if spec.get("initContainers"):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    elif spec.get("containers") is None:
        ops.append({"op": "add", "path": "/spec/containers", "value": [sidecar]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})

    volume = {"name": VOLUME, "emptyDir": {"sizeLimit": "64Mi"}}
    volumes = spec.get("volumes")
    if volumes is None:
        ops.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    elif not any(v.get("name") == VOLUME for v in volumes):
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": volume})

    stamp = status_annotation(injector.version, injector.image, native)
    if metadata.get("annotations") is None:
        if "metadata" not in pod:
            ops.append({"op": "add", "path": "/metadata", "value": {}})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {STATUS: stamp}})
    else:
        ops.append(
            {"op": "add", "path": f"/metadata/annotations/{_escape(STATUS)}", "value": stamp}
        )
    return ops


def supports_native_sidecars(git_version: str) -> bool:
    """Native sidecars (SidecarContainers) are on by default from Kubernetes 1.29."""
    core = git_version.lstrip("v").split("-")[0].split("+")[0]
    try:
        major, minor = (int(x) for x in core.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (1, 29)
