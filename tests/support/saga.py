"""A saga test bed: real participant processes behind ExternalName Services, and a real
operator process, all in one test namespace."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord_operator.envtest import local_service
from tests.support.cluster import Cluster
from tests.support.dataplane import Recorder, Sidecar, slow_link
from tests.support.operator import OperatorProcess, run_operator


@dataclass
class SagaBed:
    cluster: Cluster
    namespace: str
    services: dict[str, Recorder]
    operator: OperatorProcess | None = None
    tmp: Path = field(default_factory=Path)

    def saga(self, name: str, steps: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
        """A SagaWorkflow whose http steps point at our participants' ports."""
        steps = copy.deepcopy(steps)
        for s in steps:
            for kind in ("action", "compensation"):
                http = (s.get(kind) or {}).get("http")
                if http:
                    http.setdefault("port", self.services[http["service"]].port)
        return {
            "apiVersion": "accord.dev/v1alpha1",
            "kind": "SagaWorkflow",
            "metadata": {"name": name},
            "spec": {"steps": steps, **spec},
        }

    def apply(self, saga: dict[str, Any]) -> dict[str, Any]:
        return self.cluster.apply(saga, self.namespace)

    def wait(self, name: str, *phases: str, timeout: float = 90) -> dict[str, Any]:
        return self.cluster.wait_for(
            "saga",
            name,
            self.namespace,
            lambda o: (o.get("status") or {}).get("phase") in phases,
            timeout=timeout,
        )

    def calls(self, service: str, saga: str | None = None) -> list[str]:
        """Paths the participant executed (replays left out), optionally for one saga."""
        return [
            c["path"].lstrip("/")
            for c in self.services[service].calls()
            if not c.get("replayed")
            and (saga is None or c["headers"].get("Accord-Saga") == f"{self.namespace}/{saga}")
        ]

    def events(self, name: str) -> list[tuple[str, str]]:
        return [(e["type"], e["reason"]) for e in self.event_objects(name)]

    def event_objects(self, name: str) -> list[dict[str, Any]]:
        """The saga's Events in the order they were posted (eventTime has microseconds)."""
        items = json.loads(
            self.cluster.kubectl(
                "get", "events", "-n", self.namespace, "-o", "json",
                f"--field-selector=involvedObject.name={name}",
            )
        )["items"]  # fmt: skip
        return sorted(items, key=lambda e: e.get("eventTime") or e.get("firstTimestamp") or "")


def step(
    name: str, service: str, action: str, compensation: str | None = None, **extra: Any
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "name": name,
        "action": {"http": {"service": service, "path": f"/{action}"}},
    }
    if compensation:
        s["compensation"] = {"http": {"service": service, "path": f"/{compensation}"}}
    s.setdefault("retry", {"maxAttempts": 3, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.5}})
    s.update(extra)
    return s


@contextmanager
def saga_bed(
    cluster: Cluster, namespace: str, tmp: Path, *names: str, operator: bool = True
) -> Iterator[SagaBed]:
    with ExitStack() as stack:
        services: dict[str, Recorder] = {}
        for name in names:
            rec = Recorder(tmp, name).start()
            stack.callback(rec.close)
            services[name] = rec
            cluster.kubectl(
                "apply", "-n", namespace, "-f", "-", input=json.dumps(local_service(name))
            )
        bed = SagaBed(cluster, namespace, services, tmp=tmp)
        if operator:
            bed.operator = stack.enter_context(
                run_operator(cluster, tmp, "--controller-only", "-n", namespace)
            )
        yield bed


@dataclass
class SlowFencedParticipant:
    """A participant's app behind a real sidecar (its fence and dedup), behind a slow link
    (tests/support/slow_link.py) that holds some paths and delivers them even after the
    caller gave up. Point a step's http port at `port`; the operator needs `token`."""

    port: int
    sidecar: Sidecar
    token: str

    def via(self, s: dict[str, Any]) -> dict[str, Any]:
        """The step `s`, its action and compensation sent through the slow link."""
        for kind in ("action", "compensation"):
            if kind in s:
                s[kind]["http"]["port"] = self.port
        return s


@contextmanager
def slow_fenced_participant(
    bed: SagaBed, service: str, tmp: Path, *holds: str
) -> Iterator[SlowFencedParticipant]:
    """holds: "PATH=MILLISECONDS", e.g. "/charge=6000"."""
    token = f"{service}-fence-token"
    app = bed.services[service]
    sidecar = Sidecar(tmp, f"{service}-sidecar", ACCORD_APP_PORT=str(app.port),
                      ACCORD_SHARED_TOKEN=token,
                      ACCORD_DATA_DIR=str(tmp / f"{service}-data")).start()  # fmt: skip
    try:
        with slow_link(sidecar.inbound, tmp, *holds) as port:
            yield SlowFencedParticipant(port, sidecar, token)
    finally:
        sidecar.close()
