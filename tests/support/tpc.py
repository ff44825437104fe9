"""A 2PC test bed: real ledger participants (examples/services/ledger.py, each with its own
SQLite file) behind real sidecars (the fence), ExternalName Services, and a real operator."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord_operator.envtest import local_service
from accord_operator.envtest.controlplane import free_port
from tests.support.cluster import REPO, Cluster
from tests.support.dataplane import Process, Sidecar, _wait_port, request
from tests.support.operator import OperatorProcess, run_operator

LEDGER = REPO / "examples" / "services" / "ledger.py"
TOKEN = "tpc-test-token"


class LedgerProcess(Process):
    def __init__(self, tmp: Path, name: str) -> None:
        self.port = free_port()
        self.name = name
        self.db = tmp / f"{name}.db"
        super().__init__(
            [sys.executable, str(LEDGER), "--port", str(self.port), "--db", str(self.db),
             "--name", name],
            tmp / f"{name}.log",
        )  # fmt: skip

    def start(self) -> LedgerProcess:
        super().start()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = request("GET", f"{self.url}/_state")[1]
        return state

    def behave(self, **rules: Any) -> None:
        request("POST", f"{self.url}/_behave", rules)

    def deposit(self, account: str, cents: int) -> None:
        request("POST", f"{self.url}/_deposit", {"account": account, "amountCents": cents})


@dataclass
class Participant:
    ledger: LedgerProcess
    sidecar: Sidecar


@dataclass
class TpcBed:
    cluster: Cluster
    namespace: str
    tmp: Path
    participants: dict[str, Participant] = field(default_factory=dict)
    operators: list[OperatorProcess] = field(default_factory=list)

    def transaction(
        self, name: str, payloads: dict[str, dict[str, Any]], **spec: Any
    ) -> dict[str, Any]:
        return {
            "apiVersion": "accord.dev/v1alpha1",
            "kind": "TwoPhaseTransaction",
            "metadata": {"name": name},
            "spec": {
                "participants": [
                    {"name": p, "service": p, "port": self.participants[p].sidecar.inbound_port,
                     "payload": payload}
                    for p, payload in payloads.items()
                ],
                **spec,
            },
        }  # fmt: skip

    def apply(self, tx: dict[str, Any]) -> dict[str, Any]:
        return self.cluster.apply(tx, self.namespace)

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(
            self.cluster.kubectl("get", "tpc", name, "-n", self.namespace, "-o", "json")
        )
        return obj

    def wait(self, name: str, *phases: str, timeout: float = 90) -> dict[str, Any]:
        return self.cluster.wait_for(
            "tpc", name, self.namespace,
            lambda o: (o.get("status") or {}).get("phase") in phases, timeout=timeout,
        )  # fmt: skip

    def events(self, name: str) -> list[str]:
        items = json.loads(
            self.cluster.kubectl(
                "get", "events", "-n", self.namespace, "-o", "json",
                f"--field-selector=involvedObject.name={name}",
            )
        )["items"]  # fmt: skip
        items.sort(key=lambda e: e.get("eventTime") or e.get("firstTimestamp") or "")
        return [e["reason"] for e in items]

    def outcomes(self, uid: str) -> dict[str, str]:
        """What each participant's own database says became of the transaction."""
        out = {}
        for name, p in self.participants.items():
            state = p.ledger.state()
            out[name] = (
                "committed" if uid in state["committed"]
                else "aborted" if uid in state["aborted"] or uid not in state["holds"]
                else "held"
            )  # fmt: skip
        return out

    def start_operator(self) -> OperatorProcess:
        stack = ExitStack()
        op = stack.enter_context(
            run_operator(
                self.cluster, self.tmp, "--controller-only", "-n", self.namespace,
                env={"ACCORD_PARTICIPANT_TOKEN": TOKEN},
                log_name=f"operator-{len(self.operators)}.log",
            )
        )  # fmt: skip
        op.stack = stack  # type: ignore[attr-defined]
        self.operators.append(op)
        return op


@contextmanager
def tpc_bed(
    cluster: Cluster,
    namespace: str,
    tmp: Path,
    *names: str,
    sidecar_env: dict[str, dict[str, str]] | None = None,
) -> Iterator[TpcBed]:
    bed = TpcBed(cluster, namespace, tmp)
    with ExitStack() as stack:
        for name in names:
            ledger = LedgerProcess(tmp, name).start()
            stack.callback(ledger.close)
            sidecar = Sidecar(
                tmp, f"{name}-sidecar", ACCORD_APP_PORT=str(ledger.port),
                ACCORD_SHARED_TOKEN=TOKEN, ACCORD_DATA_DIR=str(tmp / f"{name}-data"),
                **(sidecar_env or {}).get(name, {}),
            ).start()  # fmt: skip
            stack.callback(sidecar.close)
            bed.participants[name] = Participant(ledger, sidecar)
            cluster.kubectl(
                "apply", "-n", namespace, "-f", "-", input=json.dumps(local_service(name))
            )
        try:
            yield bed
        finally:
            for op in bed.operators:
                op.stack.close()  # type: ignore[attr-defined]
