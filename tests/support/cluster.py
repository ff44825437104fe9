"""What tests use to talk to the real local control plane: kubectl and a few waits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from accord_operator.envtest import ControlPlane

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CRDS = REPO / "crds"


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


class Cluster:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    def env(self) -> dict[str, str]:
        return self.cp.env()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = self.cp.kubectl(*args, input=input, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def try_apply(self, obj: dict[str, Any], namespace: str) -> tuple[int, str]:
        """kubectl apply; returns (exit code, stderr) so tests can assert refusals."""
        result = self.cp.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False
        )
        return result.returncode, result.stderr

    def apply(self, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
        code, err = self.try_apply(obj, namespace)
        assert code == 0, f"apply refused: {err}"
        return self.get(obj["kind"], obj["metadata"]["name"], namespace)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            self.kubectl("get", kind, name, "-n", namespace, "-o", "json")
        )
        return out

    def exists(self, kind: str, name: str, namespace: str) -> bool:
        result = self.cp.kubectl("get", kind, name, "-n", namespace, "-o", "name", check=False)
        if result.returncode != 0 and "NotFound" not in result.stderr:
            raise AssertionError(result.stderr)
        return result.returncode == 0

    def wait_for(
        self,
        kind: str,
        name: str,
        namespace: str,
        until: Callable[[dict[str, Any]], bool],
        timeout: float = 60,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.exists(kind, name, namespace):
                obj = self.get(kind, name, namespace)
                if until(obj):
                    return obj
            time.sleep(0.25)
        raise AssertionError(
            f"{kind}/{name} did not reach the state in {timeout}s; last: {obj.get('status')}"
        )
