"""Two ways to get a real cluster running Accord's own images, for one list of scenarios:

- node: the local control plane with a real node on this machine (envtest.node), images
  built here with buildah on a debootstrap base and imported into the node's containerd;
- kind: a kind cluster (needs a Docker engine), images built with docker on the public base.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from accord_operator.envtest.binaries import find_binaries
from accord_operator.envtest.incluster import helm
from tests.support.cluster import REPO

IMAGES = {
    "operator": ("operator/Dockerfile", "."),
    "sidecar": ("sidecar_images/sidecar/Dockerfile", "sidecar_images/sidecar"),
    "samples": ("examples/services/Dockerfile", "."),
    "nats": ("hack/images/nats.Dockerfile", ""),  # context: this machine's nats-server
}


def run(
    *args: str,
    input: str | None = None,
    timeout: float = 600,
    check: bool = True,
    stderr: bool = False,
) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, input=input, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}")
    return result.stdout + (result.stderr if stderr else "")


@dataclass
class E2ECluster:
    """A running cluster with Accord's images loaded; what the scenarios use."""

    provider: str
    kubeconfig: Path
    images: dict[str, str]  # name -> image reference
    logs: Callable[[str], str] = field(default=lambda _name: "")
    audit_log: Path | None = None  # the API server's, where the provider has one of ours

    def webhooks_called_for_pod(self, namespace: str, name: str) -> list[str]:
        """The mutating webhooks the API server called when this pod was created."""
        assert self.audit_log is not None
        time.sleep(2)  # the audit log is written in batches of at most a second
        called = []
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if (event["verb"], ref.get("resource"), ref.get("namespace")) != (
                "create",
                "pods",
                namespace,
            ) or not (ref.get("name") == name or f'"name":"{name}"' in line):
                continue
            for key, value in (event.get("annotations") or {}).items():
                if "mutation.webhook.admission.k8s.io" in key:
                    called.append(json.loads(value)["webhook"])
        return called

    def calls_of(self, username: str) -> dict[tuple[str, str], set[str]]:
        """What this user asked the API server for, from its audit log, as RBAC keys."""
        assert self.audit_log is not None
        time.sleep(2)  # the audit log is written in batches of at most a second
        calls: dict[tuple[str, str], set[str]] = {}
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            ref = event.get("objectRef")
            if event["user"]["username"] != username or ref is None:
                continue
            resource = ref["resource"] + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            calls.setdefault((ref.get("apiGroup", ""), resource), set()).add(event["verb"])
        return calls

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, stderr: bool = False
    ) -> str:
        """kubectl's stdout (with stderr: both, for refusals)."""
        return run(
            str(find_binaries().kubectl),
            f"--kubeconfig={self.kubeconfig}",
            *args,
            input=input,
            check=check,
            stderr=stderr,
        )

    def helm(self, *args: str, timeout: float = 600) -> str:
        return helm(self.kubeconfig, *args, timeout=timeout)

    def api_status(self, path: str, token: str) -> int:
        """The API server's HTTP status for GET path with this bearer token only."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        ctx = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        request = urllib.request.Request(
            cluster["server"] + path, headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def apply(self, *docs: dict[str, Any], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)})
        self.kubectl("apply", *ns, "-f", "-", input=body)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def diagnose(self) -> str:
        """What a human would look at first when a scenario fails."""
        parts = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False)]
        # The sidecars of the newest pods: most likely the failing scenario's.
        try:
            pods = json.loads(self.kubectl("get", "pods", "-A", "-o", "json", check=False))
        except ValueError:
            pods = {}
        ours = [
            p for p in pods.get("items", [])
            if any(c["name"] == "accord-sidecar" for c in p["spec"].get("containers", []))
        ]  # fmt: skip
        ours.sort(key=lambda p: p["metadata"]["creationTimestamp"])
        for pod in ours[-3:]:
            meta = pod["metadata"]
            parts.append(f"--- accord-sidecar of {meta['namespace']}/{meta['name']}")
            logs = ("logs", "-n", meta["namespace"], meta["name"], "-c", "accord-sidecar")
            parts.append(self.kubectl(*logs, "--tail=30", check=False))
        parts.append(
            self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)[-6000:]
        )
        for component in ("controller", "webhook"):
            parts.append(f"--- accord {component} logs")
            parts.append(
                self.kubectl(
                    "logs", "-n", "accord-system", "--tail=60", "--all-containers",
                    "-l", f"app.kubernetes.io/component={component}", check=False,
                )
            )  # fmt: skip
        return "\n".join(parts)

    def wait_until(
        self, what: str, probe: Callable[[], Any], timeout: float = 120, every: float = 0.5
    ) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(every)
        raise AssertionError(f"{what}: not within {timeout}s (last: {last})")


def docker_missing() -> str | None:
    """Why kind cannot run here (None: a Docker engine answers)."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"no Docker engine reachable ({lines[-1] if lines else 'docker info failed'})"
    return None


@contextmanager
def node_cluster() -> Iterator[E2ECluster]:
    from accord_operator.envtest.images import build_images
    from accord_operator.envtest.node import LocalCluster

    images = build_images(*IMAGES)
    with LocalCluster() as cluster:
        cluster.import_images(images.values())
        yield E2ECluster(
            "node",
            cluster.kubeconfig,
            {name: image.ref for name, image in images.items()},
            logs=cluster.log_tail,
            audit_log=cluster.cp.audit_log if cluster.cp else None,
        )


@contextmanager
def kind_cluster(workdir: Path) -> Iterator[E2ECluster]:
    kind = run(str(REPO / "hack" / "build-kind.sh")).strip()
    name = "accord-e2e"
    kubeconfig = workdir / "kubeconfig"
    run(
        kind, "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig), "--wait", "180s"
    )
    try:
        refs = {}
        for image, (dockerfile, context) in IMAGES.items():
            ref = f"accord/{image}:e2e"
            if not context:  # the nats image: the nats-server binary alone
                staged = workdir / image
                staged.mkdir(exist_ok=True)
                shutil.copy2(shutil.which("nats-server") or "nats-server", staged / "nats-server")
                context = str(staged)
            run(
                "docker",
                "build",
                "-q",
                "-t",
                ref,
                "-f",
                str(REPO / dockerfile),
                str(REPO / context),
            )
            run(kind, "load", "docker-image", ref, "--name", name)
            refs[image] = ref
        yield E2ECluster("kind", kubeconfig, refs)
    finally:
        subprocess.run([kind, "delete", "cluster", "--name", name], capture_output=True)
