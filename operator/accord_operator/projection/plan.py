"""A CQRSProjection as Kubernetes objects and as a status, in pure functions (no I/O):
what the operator wants to exist (the projector's Deployment for a generation, the query
Service) and what the broker's figures mean (phase, lag, position).

One generation of the read model runs as one Deployment, `<name>-g<generation>`: its pods
carry the projector container and ask for the Accord sidecar, subscribed to the source
topic in order (one sidecar delivers at a time). The sidecar names its durable consumer
after its app, here `<name>-g<generation>` (accord_wire.consumer_name): a new generation
gets a new consumer, which starts from the beginning of the stream. With `partitions` > 1
there is a consumer per partition (events split by partition key) and the replicas' sidecars
share the partitions out, one owner per partition at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import accord_wire as wire
from accord_operator.conditions import Condition, set_condition
from accord_operator.resources import GROUP, PROJECTION, VERSION

LABEL: str = f"{GROUP}/projection"  # on every object made for a projection: its name
GENERATION_LABEL: str = f"{GROUP}/projection-generation"
SPEC_HASH: str = f"{GROUP}/spec-hash"  # on a made object: the desired spec it was made from
GENERATION_ENV = "ACCORD_PROJECTION_GENERATION"  # which read model the projector fills
NAME_ENV = "ACCORD_PROJECTION_NAME"
DATA_ENV = "ACCORD_PROJECTION_DATA"  # where the projector may keep what must outlive a restart
TOPIC_ENV = "ACCORD_PROJECTION_TOPIC"  # the topic, for read-your-writes waits on its sidecar
QUERY_PORT = 80  # the query Service's port, to the projector's own port
# What PSS `restricted` asks of a container.
RESTRICTED: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


PARKED_ANNOTATION: str = f"{GROUP}/parked"  # retry | skip: what to do with parked events
RESET_PATH = "/projection/reset"  # in-place rebuilds: called on the projector before a replay
DATA_DIR = "/data"  # the projector's scratch volume (an emptyDir: kept across restarts)


def consumers(name: str, generation: int, spec: Mapping[str, Any]) -> list[str]:
    """The broker consumers of one generation: one, or one per partition."""
    app, topic, partitions = (
        app_id(name, generation),
        spec["source"]["topic"],
        int(spec.get("partitions", 1)),
    )
    if partitions <= 1:
        return [wire.consumer_name(app, topic)]
    return [wire.consumer_name(app, topic, (i, partitions)) for i in range(partitions)]


def app_id(name: str, generation: int) -> str:
    """The projector's app name for one generation: its Deployment and its consumer."""
    return f"{name}-g{generation}"


def _owner(proj: Mapping[str, Any]) -> dict[str, Any]:
    meta = proj["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": PROJECTION.kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _hashed(obj: dict[str, Any]) -> dict[str, Any]:
    """The object with the hash of what it asks for in an annotation: a made object whose
    hash differs from the wanted one's is replaced (no field-by-field diff)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH] = digest
    return obj


def replicas(spec: Mapping[str, Any]) -> int:
    """Projector pods wanted: spec.replicas (at most partitions), 0 while paused."""
    if spec.get("paused"):
        return 0
    return max(0, min(int(spec.get("replicas", 1)), int(spec.get("partitions", 1))))


def deployment(proj: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """The projector's Deployment for one generation of the read model."""
    meta, spec = proj["metadata"], proj["spec"]
    name, app = meta["name"], app_id(meta["name"], generation)
    source, projector = spec["source"], spec["projector"]
    labels = {
        "app.kubernetes.io/name": app,  # the sidecar's app id: its consumer's name
        "app.kubernetes.io/component": "projector",
        "app.kubernetes.io/managed-by": "accord",
        LABEL: name,
        GENERATION_LABEL: str(generation),
    }
    port = int(projector.get("port", 8080))
    container: dict[str, Any] = {
        "name": "projector",
        "image": projector["image"],
        "ports": [{"name": "http", "containerPort": port}],
        "env": [
            {"name": GENERATION_ENV, "value": str(generation)},
            {"name": NAME_ENV, "value": name},
            {"name": TOPIC_ENV, "value": source["topic"]},
            {"name": DATA_ENV, "value": DATA_DIR},
            *(
                {"name": e["name"], "value": str(e.get("value", ""))}
                for e in projector.get("env") or []
            ),
        ],
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}],
        "securityContext": RESTRICTED,
    }
    for key in ("command", "args"):
        if projector.get(key):
            container[key] = list(projector[key])
    if projector.get("imagePullPolicy"):
        container["imagePullPolicy"] = projector["imagePullPolicy"]
    annotations = {
        f"{GROUP}/inject": "true",
        f"{GROUP}/app-port": str(port),
        f"{GROUP}/subscribe": source["topic"],
        f"{GROUP}/subscribe-concurrency": "1",  # one event in flight: order kept
        f"{GROUP}/max-deliveries": str(int(source.get("maxDeliveries", 5))),
        # A poison event parks its key (later events of the key wait behind it, other keys
        # go on) until the projection's accord.dev/parked annotation retries or skips it.
        f"{GROUP}/subscribe-poison": "park",
        # A new generation's consumer replays the retained stream (or only what comes).
        f"{GROUP}/subscribe-start": "new" if source.get("startFrom") == "New" else "all",
    }
    if spec.get("rebuild") == "InPlace":  # the sidecar empties the model before a replay
        annotations[f"{GROUP}/subscribe-reset"] = RESET_PATH
    batch = int(projector.get("batchSize", 1))
    if batch > 1:  # a CloudEvents batch per delivery, still in order
        annotations[f"{GROUP}/subscribe-bulk"] = str(batch)
    partitions = int(spec.get("partitions", 1))
    if partitions > 1:  # split by partition key, shared out among the replicas
        annotations[f"{GROUP}/subscribe-partitions"] = str(partitions)
    return _hashed({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": app,
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [_owner(proj)],
        },
        "spec": {
            "replicas": replicas(spec),
            # Replaced all at once: a generation's read model is never written by two
            # versions of its projector. (Within a version, replicas share the partitions
            # out through their sidecars: each partition has one owner at a time.)
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {LABEL: name, GENERATION_LABEL: str(generation)}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "containers": [container],
                    # Scratch space for the projector that outlives a container restart
                    # (not the pod): a local read model or cache.
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "securityContext": {"runAsNonRoot": True},
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    })  # fmt: skip


def query_service(proj: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """The projection's query Service, `<name>`: to the projectors of the generation that
    serves (port 80 to the projector's port)."""
    meta, spec = proj["metadata"], proj["spec"]
    port = int(spec["projector"].get("port", 8080))
    return _hashed({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": {LABEL: meta["name"], "app.kubernetes.io/managed-by": "accord"},
            "ownerReferences": [_owner(proj)],
        },
        "spec": {
            "selector": {LABEL: meta["name"], GENERATION_LABEL: str(generation)},
            "ports": [{"name": "http", "port": QUERY_PORT, "targetPort": port}],
        },
    })  # fmt: skip


def stale(made: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """A made object that is missing or was made from another wanted spec."""
    if made is None:
        return True
    have = ((made.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH)
    return bool(have != wanted["metadata"]["annotations"][SPEC_HASH])


@dataclass(frozen=True)
class Progress:
    """What the broker says about one generation's consumer (None: not made yet)."""

    stream_found: bool
    topic_events: int  # events of the topic in the stream
    consumer_found: bool = False
    pending: int = 0  # not yet delivered
    ack_pending: int = 0  # delivered, not yet acknowledged
    position: int = 0  # stream sequence everything up to which is projected
    redelivered: int = 0  # delivered more than once and not yet acknowledged
    last_event_time: str | None = None
    failing: str | None = None  # the head event keeps failing (its sidecar's report)
    parked_keys: int = 0  # keys waiting behind a poison event
    dead_lettered: int = 0  # events sent to the dead-letter topic, ever (this generation)
    stream_problem: str | None = None  # the stream cannot be this projection's source
    parked_events: int = 0


def next_status(
    proj: Mapping[str, Any],
    generation: int,
    progress: Progress | None,
    ready_replicas: int,
    now: str,
    broker_problem: str | None = None,
) -> dict[str, Any]:
    """The status the projection should show now (a full status; the caller writes it only
    when it differs from the stored one in something but conditions' times)."""
    meta, spec = proj["metadata"], proj["spec"]
    old: Mapping[str, Any] = proj.get("status") or {}
    wanted_replicas = replicas(spec)
    status: dict[str, Any] = {
        "observedGeneration": int(meta.get("generation", 1)),
        "observedRebuildGeneration": generation,
        "servingGeneration": generation,
        "readyReplicas": ready_replicas,
    }
    if progress is not None and progress.consumer_found:
        lag = progress.pending + progress.ack_pending
        status.update(
            position=progress.position,
            lag=lag,
            eventsProcessed=max(0, progress.topic_events - lag),
        )
    elif progress is not None:
        # No consumer yet: every event of the topic is still to be projected (none, for a
        # projection that starts with what comes next).
        backlog = 0 if spec["source"].get("startFrom") == "New" else progress.topic_events
        status.update(position=0, lag=backlog, eventsProcessed=0)
    if progress is not None and progress.consumer_found:
        status.update(
            parkedKeys=progress.parked_keys,
            parkedEvents=progress.parked_events,
            deadLettered=progress.dead_lettered,
        )
    if progress is not None and progress.last_event_time:
        status["lastEventTime"] = progress.last_event_time
    elif old.get("lastEventTime"):
        status["lastEventTime"] = old["lastEventTime"]

    if broker_problem:
        phase, reason, message = "Pending", "BrokerUnavailable", broker_problem
        # What was last known stays shown, marked by the message.
        for key in ("position", "lag", "eventsProcessed"):
            if key in old and key not in status:
                status[key] = old[key]
    elif wanted_replicas == 0:
        phase, reason = "Pending", "Paused"
        message = "paused: no projector runs; the position is kept by the broker"
    elif ready_replicas < 1:
        phase, reason, message = "Pending", "ProjectorNotReady", "waiting for a projector pod"
    elif progress is not None and progress.failing:
        phase, reason = "Degraded", "DeliveriesFailing"
        message = f"{progress.failing}; {status.get('lag', 0)} behind"
    elif progress is not None and progress.redelivered > 0 and status.get("lag", 0) > 0:
        phase, reason = "Degraded", "DeliveriesFailing"
        message = (
            f"{progress.redelivered} event(s) delivered again and not yet projected; "
            f"{status['lag']} behind"
        )
    elif status.get("lag", 0) > 0:
        phase, reason = "CatchingUp", "CatchingUp"
        message = f"{status['lag']} event(s) behind the stream"
    else:
        phase, reason, message = "Live", "Live", "caught up with the stream"
    if status.get("parkedKeys"):
        message += (
            f"; {status['parkedKeys']} key(s) parked behind a poison event "
            f"({status['parkedEvents']} event(s)): annotate {PARKED_ANNOTATION}=retry or =skip"
        )
    status.update(phase=phase, message=message)
    status["conditions"] = conditions_for(
        list(old.get("conditions") or []), phase, reason, message, status["observedGeneration"], now
    )
    return status


def conditions_for(
    conditions: list[Condition], phase: str, reason: str, message: str, generation: int, now: str
) -> list[Condition]:
    """kstatus: Ready when Live; Reconciling while it catches up or waits; Stalled when it
    cannot make progress on its own (deliveries failing, broker away)."""
    stalled = phase == "Degraded" or reason == "BrokerUnavailable"
    values = {
        "Ready": "True" if phase == "Live" else "False",
        "Reconciling": (
            "True" if phase in ("Pending", "CatchingUp", "Rebuilding") and not stalled else "False"
        ),
        "Stalled": "True" if stalled else "False",
    }
    for type_, value in values.items():
        conditions = set_condition(
            conditions, type=type_, status=value,  # type: ignore[arg-type]
            reason=reason, message=message, generation=generation, now=now,
        )  # fmt: skip
    return conditions


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Worth a write: anything but the conditions' transition times differs."""

    def bare(status: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in status.items() if k != "conditions"}
        out["conditions"] = sorted(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
            for c in status.get("conditions") or []
        )
        return out

    return bare(old) != bare(new)
