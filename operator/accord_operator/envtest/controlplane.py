"""Start and stop etcd, kube-apiserver and kube-controller-manager on loopback.

Like controller-runtime's envtest: TLS everywhere, RBAC on, service-account signing keys,
an admin client certificate in system:masters and a kubeconfig that uses it. Children die
with their parent (PR_SET_PDEATHSIG) and temp dirs of dead runs are reaped at the next
start, so an interrupted or killed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from accord_operator.certs import CertificateAuthority, service_account_keys
from accord_operator.envtest.binaries import Binaries, find_binaries
from accord_operator.envtest.janitor import alive

_PREFIX = "accord-envtest-"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP_KUBERNETES = "10.0.0.1"
_AUDIT_SERVICE_ACCOUNTS = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        # Pod creations by anyone: their annotations say which admission webhooks were called.
        {
            "level": "Metadata",
            "verbs": ["create"],
            "resources": [{"group": "", "resources": ["pods"]}],
        },
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test runner dies without stopping
    # us, the kernel kills the control plane instead of leaving it orphaned. SIGKILL, not
    # SIGTERM: a throwaway cluster has nothing to flush, and kube-apiserver's graceful
    # shutdown can outlive the test run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def reap_stale_dirs() -> None:
    """Remove temp dirs left by runs whose process no longer exists."""
    for path in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            owner = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not alive(owner):
            shutil.rmtree(path, ignore_errors=True)


class ControlPlane:
    """One local cluster. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        binaries: Binaries | None = None,
        *,
        controller_manager: bool = True,
        extra_apiserver_args: tuple[str, ...] = (),
        address: str = "127.0.0.1",
        launcher: tuple[str, ...] = (),
        for_nodes: bool = False,
    ) -> None:
        """address: where the API server listens and what it advertises (loopback, or a
        node's IP inside the node's network namespace); launcher: a command prefix every
        process runs under (nsenter into that namespace); for_nodes: serve real kubelets
        (Node authorization, NodeRestriction, the node controllers, kubelet client cert)."""
        self.binaries = binaries or find_binaries()
        self.with_controller_manager = controller_manager
        self.extra_apiserver_args = extra_apiserver_args
        self.address = address
        self.launcher = launcher
        self.for_nodes = for_nodes
        self.dir: Path | None = None
        self.server = ""
        self.kubeconfig = Path()
        self.ca: CertificateAuthority | None = None  # signs node and component certificates
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> ControlPlane:
        reap_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        assert self.dir is not None
        d = self.dir
        pki = d / "pki"
        pki.mkdir()
        ca = self.ca = CertificateAuthority()
        (pki / "ca.crt").write_bytes(ca.cert_pem)
        etcd_cert, etcd_key = ca.issue(
            "etcd", hosts=("127.0.0.1", "localhost"), server=True, client=True
        ).write(pki, "etcd")
        etcd_client_cert, etcd_client_key = ca.issue(
            "kube-apiserver-etcd-client", client=True
        ).write(pki, "etcd-client")
        api_cert, api_key = ca.issue(
            "kube-apiserver",
            hosts=(
                *dict.fromkeys(("127.0.0.1", self.address)),
                "localhost",
                SERVICE_IP_KUBERNETES,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            server=True,
        ).write(pki, "apiserver")
        admin = ca.issue("accord-admin", organizations=("system:masters",), client=True)
        sa_pub, sa_key = service_account_keys().write(pki, "sa")

        etcd_port, etcd_peer = free_port(), free_port()
        etcd_url = f"https://127.0.0.1:{etcd_port}"
        self.spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                f"--cert-file={etcd_cert}",
                f"--key-file={etcd_key}",
                f"--trusted-ca-file={pki / 'ca.crt'}",
                "--client-cert-auth",
                # A throwaway cluster: durability of fsync buys nothing and costs seconds.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        api_port = free_port()
        self.server = f"https://{self.address}:{api_port}"
        node_args: list[str] = []
        if self.for_nodes:
            # What service accounts ask for (tests compare our grants with our calls), and
            # which webhooks each pod creation went through.
            policy = d / "audit-policy.yaml"
            policy.write_text(yaml.safe_dump(_AUDIT_SERVICE_ACCOUNTS))
            node_args += [
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=batch",
                "--audit-log-batch-max-wait=1s",
            ]
            kubelet_cert, kubelet_key = ca.issue(
                "kube-apiserver-kubelet-client", organizations=("system:masters",), client=True
            ).write(pki, "apiserver-kubelet-client")
            node_args += [
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={kubelet_cert}",
                f"--kubelet-client-key={kubelet_key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
            ]
        self.spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                f"--etcd-cafile={pki / 'ca.crt'}",
                f"--etcd-certfile={etcd_client_cert}",
                f"--etcd-keyfile={etcd_client_key}",
                # Inside a node's network namespace: reachable from pods and the host.
                f"--bind-address={'0.0.0.0' if self.for_nodes else '127.0.0.1'}",
                f"--advertise-address={self.address}",
                f"--secure-port={api_port}",
                f"--cert-dir={d / 'apiserver-certs'}",
                f"--tls-cert-file={api_cert}",
                f"--tls-private-key-file={api_key}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--authorization-mode={'Node,RBAC' if self.for_nodes else 'RBAC'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--api-audiences=https://kubernetes.default.svc",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=0",
                *node_args,
                *self.extra_apiserver_args,
            ],
        )

        self.kubeconfig = d / "kubeconfig"
        self.kubeconfig.write_text(
            yaml.safe_dump(self._kubeconfig(ca.cert_pem, admin.cert_pem, admin.key_pem))
        )
        self.kubeconfig.chmod(0o600)
        admin_cert, admin_key = admin.write(pki, "admin")
        self._wait_ready(pki / "ca.crt", admin_cert, admin_key, timeout)

        if self.with_controller_manager:
            self.spawn(
                "kube-controller-manager",
                [
                    str(self.binaries.kube_controller_manager),
                    f"--kubeconfig={self.kubeconfig}",
                    f"--authentication-kubeconfig={self.kubeconfig}",
                    f"--authorization-kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    f"--cert-dir={d / 'kcm-certs'}",
                    f"--service-account-private-key-file={sa_key}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    f"--controllers={','.join(self._controllers())}",
                    "--v=0",
                ],
            )

    @property
    def audit_log(self) -> Path:
        """JSON lines: every request of a service account (clusters for nodes only)."""
        assert self.dir is not None
        return self.dir / "audit.log"

    def _controllers(self) -> list[str]:
        # Only what workloads in tests need: no cloud. Without a node, no node controllers.
        names = [
            "namespace",
            "serviceaccount",
            "serviceaccount-token",
            "garbagecollector",
            "deployment",
            "replicaset",
            "statefulset",
            "job",
            "endpoint",
            "endpointslice",
            "clusterrole-aggregation",
        ]
        if self.for_nodes:
            # Pods mount kube-root-ca.crt; dead pods and finished Jobs are collected; a node
            # that stops reporting is marked NotReady and its pods evicted.
            names += ["root-ca-cert-publisher", "podgc", "ttl-after-finished", "nodelifecycle"]
            names += ["daemonset", "cronjob", "disruption", "resourcequota"]
        return names

    def client_kubeconfig(self, name: str, cert: bytes, key: bytes) -> Path:
        """A kubeconfig for another identity (a node, the scheduler, kube-proxy)."""
        assert self.dir is not None and self.ca is not None
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(self._kubeconfig(self.ca.cert_pem, cert, key)))
        path.chmod(0o600)
        return path

    def _kubeconfig(self, ca: bytes, cert: bytes, key: bytes) -> dict[str, object]:
        import base64

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "accord-local",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(ca)},
                }
            ],
            "users": [
                {
                    "name": "accord-admin",
                    "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
                }
            ],
            "contexts": [
                {
                    "name": "accord-local",
                    "context": {"cluster": "accord-local", "user": "accord-admin"},
                }
            ],
            "current-context": "accord-local",
        }

    def spawn(self, name: str, argv: list[str]) -> None:
        """Start a process of this cluster (under the launcher); it dies with us."""
        assert self.dir is not None
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self._procs[name] = subprocess.Popen(
            [*self.launcher, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop them in order
        )
        log.close()

    def _wait_ready(self, ca: Path, cert: Path, key: Path, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                    )
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(
            f"kube-apiserver not ready after {timeout}s ({last}):\n"
            f"{self.log_tail('kube-apiserver')}"
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            )
        return ""

    def stop(self) -> None:
        # Reverse start order: clients of etcd first, etcd last.
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences ----------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for child processes (kubectl, the operator) that use this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        path = env.get("PATH", "")
        env["PATH"] = f"{self.binaries.kubectl.parent}{os.pathsep}{path}"
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with check, a failure raises with its stderr."""
        result = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result
