"""A local cluster with a real node: the control plane plus kubelet, containerd, runc, CNI,
kube-proxy, kube-scheduler and CoreDNS, isolated in namespaces of its own.

Layout (one run; several runs can share a machine):

    host ─ veth acc<id>h 10.223.N.1/30 ──── acc<id>n 10.223.N.2/30  (the node's netns)
                                                 │  etcd, kube-apiserver (:port on the node IP),
                                                 │  controller-manager, scheduler, CoreDNS
                                                 └─ PID + mount namespace (nodeinit is PID 1):
                                                    containerd, kubelet, kube-proxy, pods on cni0

Nothing on the host changes: every iptables rule and sysctl the node sets lives in its
network namespace; every mount in its own mount namespace; the kernel knobs the kubelet
writes host-wide are bind-mounted stand-ins; pod cgroups live under a cgroup root of
their own. A SIGKILL of the owner ends every process (PDEATHSIG, then the PID namespace),
the network namespace and its veth with them; a detached janitor then removes the cgroups
and directories.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accord_operator.envtest import janitor
from accord_operator.envtest.binaries import (
    HACK,
    Binaries,
    cache_dir,
    find_binaries,
    pinned_kubernetes_version,
)
from accord_operator.envtest.controlplane import ControlPlane, die_with_parent, free_port
from accord_operator.envtest.images import Image
from accord_operator.envtest.oci import single_binary_image

NODE_NAME = "accord-node"
POD_CIDR = "10.244.0.0/24"
CLUSTER_DNS = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
_PREFIX = "accord-node-"
_CGROUP_FS = Path("/sys/fs/cgroup")
# What the kubelet writes host-wide unless protectKernelDefaults; these get stand-ins.
_KERNEL_DEFAULTS = {
    "/proc/sys/vm/overcommit_memory": "1",
    "/proc/sys/vm/panic_on_oom": "0",
    "/proc/sys/kernel/panic": "10",
    "/proc/sys/kernel/panic_on_oops": "1",
    "/proc/sys/kernel/keys/root_maxkeys": "1000000",
    "/proc/sys/kernel/keys/root_maxbytes": "25000000",
}


class NodeUnavailable(RuntimeError):
    """This machine cannot run a real node; the message names what is missing."""


@dataclass(frozen=True)
class NodeBinaries:
    kubelet: Path
    kube_proxy: Path
    kube_scheduler: Path
    containerd: Path
    ctr: Path
    shim: Path
    coredns: Path
    pause: Path
    cni_dir: Path
    runc: Path

    @property
    def path(self) -> str:
        """PATH for the node: containerd finds its shim and runc, the kubelet iptables."""
        dirs = dict.fromkeys(
            [
                str(self.containerd.parent),
                str(self.runc.parent),
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
        )
        return os.pathsep.join(dirs)


def find_node_binaries(build: bool = True) -> NodeBinaries:
    """The node's binaries from the same cache as the control plane's (built when missing);
    runc from Debian (PATH)."""
    d = cache_dir()

    def collect() -> NodeBinaries | None:
        names = [
            "kubelet",
            "kube-proxy",
            "kube-scheduler",
            "containerd",
            "ctr",
            "containerd-shim-runc-v2",
            "coredns",
            "pause",
        ]
        if not all((d / n).is_file() for n in names) or not (d / "cni" / "bridge").is_file():
            return None
        runc = shutil.which("runc") or "/usr/sbin/runc"
        return NodeBinaries(*(d / n for n in names), cni_dir=d / "cni", runc=Path(runc))

    found = collect()
    if found is None and build:
        subprocess.run([str(HACK / "build-binaries.sh")], check=True, stdout=subprocess.DEVNULL)
        found = collect()
    if found is None:
        raise NodeUnavailable(
            f"the node's binaries are not built; run {HACK / 'build-binaries.sh'}"
        )
    return found


def preflight(binaries: NodeBinaries | None = None) -> list[str]:
    """What this machine lacks to run a node (empty: it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root (namespaces, mounts, cgroups)")
    for tool in ("unshare", "nsenter", "ip", "iptables", "mount"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            problems.append(f"the {tool} command")
    if binaries is not None and not binaries.runc.exists():
        problems.append("runc (apt-get install runc)")
    if not Path("/proc/self/ns/net").exists() or not Path("/proc/self/ns/pid").exists():
        problems.append("network and PID namespaces in this kernel")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems:
        problems.append("the overlay filesystem (containerd's snapshotter)")
    if not _cgroup_mounts():
        problems.append(f"cgroups mounted under {_CGROUP_FS}")
    return problems


def _cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 controllers and v2)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        mountpoint = Path(left.split()[4])
        if fstype in ("cgroup", "cgroup2") and _CGROUP_FS in (mountpoint, *mountpoint.parents):
            found.append(mountpoint)
    return found


def _free_subnet() -> int:
    """A /30 under 10.223.0.0/16 no interface or route on this host uses."""
    used = (
        subprocess.run(
            ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
        ).stdout
        + subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    )
    for _ in range(200):
        n = secrets.randbelow(16000) * 4
        net = ipaddress.ip_network(f"10.223.{n // 256}.{n % 256}/30")
        if f" {net.network_address + 1}/" not in used and str(net) not in used:
            return n
    raise NodeUnavailable("no free /30 under 10.223.0.0/16 for the node's veth")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise NodeUnavailable(f"{' '.join(argv)} failed: {result.stderr.strip()}")


class LocalCluster:
    """The local control plane with one real node; a context manager like ControlPlane.

    Tests, the demo and the benchmarks share it: pods really run, Services resolve as
    <svc>.<ns>.svc, and images built here are imported with import_images().
    """

    def __init__(
        self, binaries: Binaries | None = None, node_binaries: NodeBinaries | None = None
    ) -> None:
        self.binaries = binaries or find_binaries()
        self.node_binaries = node_binaries or find_node_binaries()
        self.id = secrets.token_hex(3)
        self.dir: Path | None = None
        self.cp: ControlPlane | None = None
        self.node_ip = ""
        self._host_if = f"acc{self.id}h"
        self._holder: subprocess.Popen[bytes] | None = None
        self._node: subprocess.Popen[bytes] | None = None
        self._janitor: subprocess.Popen[bytes] | None = None
        self._cleanup: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.images: dict[str, Image] = {}  # imported, by name

    # -- what ControlPlane offers, for code that takes either -----------------------
    @property
    def kubeconfig(self) -> Path:
        assert self.cp is not None
        return self.cp.kubeconfig

    @property
    def server(self) -> str:
        assert self.cp is not None
        return self.cp.server

    def env(self) -> dict[str, str]:
        assert self.cp is not None
        return self.cp.env()

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self.cp is not None
        return self.cp.kubectl(*args, input=input, check=check)

    def log_tail(self, name: str, lines: int = 30) -> str:
        for d in (self.dir, self.cp.dir if self.cp else None):
            if d is not None and (d / f"{name}.log").exists():
                text = (d / f"{name}.log").read_text(errors="replace")
                return "\n".join(text.splitlines()[-lines:])
        return ""

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> LocalCluster:
        problems = preflight(self.node_binaries)
        if problems:
            raise NodeUnavailable("cannot run a real node here; missing: " + "; ".join(problems))
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX))
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _phase(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = now - started
        return now

    def _start(self, timeout: float) -> None:
        assert self.dir is not None
        t = t0 = time.monotonic()
        netns = self._make_netns()
        self._start_janitor()
        t = self._phase("network", t)
        launcher = ("nsenter", f"--net={netns}", "--")
        self.cp = ControlPlane(
            self.binaries, address=self.node_ip, launcher=launcher, for_nodes=True
        )
        self.cp.start(timeout)
        self._cleanup["dirs"].append(str(self.cp.dir))
        self._write_janitor_spec()
        t = self._phase("control plane", t)
        self._start_node(netns)
        self._start_scheduler_and_dns()
        self._wait_node_ready(timeout)
        t = self._phase("node ready", t)
        self._import(self._pause_archive())
        self._phase("pause image", t)
        self.timings["total"] = time.monotonic() - t0

    def _make_netns(self) -> str:
        assert self.dir is not None
        # The network namespace lives exactly as long as its processes: no `ip netns add`
        # bind mount that could outlive a SIGKILL.
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "infinity"],
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        netns = f"/proc/{self._holder.pid}/ns/net"
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(netns) == ours:
            if time.monotonic() > deadline or self._holder.poll() is not None:
                raise NodeUnavailable("unshare --net did not make a network namespace")
            time.sleep(0.01)
        n = _free_subnet()
        host_ip = f"10.223.{n // 256}.{n % 256 + 1}"
        self.node_ip = f"10.223.{n // 256}.{n % 256 + 2}"
        node_if = f"acc{self.id}n"
        _run(
            "ip",
            "link",
            "add",
            self._host_if,
            "type",
            "veth",
            "peer",
            "name",
            node_if,
            "netns",
            str(self._holder.pid),
        )
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", self._host_if)
        _run("ip", "link", "set", self._host_if, "up")
        inside = ("nsenter", f"--net={netns}", "--")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{self.node_ip}/30", "dev", node_if)
        _run(*inside, "ip", "link", "set", node_if, "up")
        _run(*inside, "ip", "route", "add", "default", "via", host_ip)
        return netns

    def _start_janitor(self) -> None:
        assert self.dir is not None and self._holder is not None
        self._cleanup = {
            "owner": os.getpid(),
            "wait_pids": [self._holder.pid],
            "cgroups": [str(m / f"accord-{self.id}") for m in _cgroup_mounts()],
            "dirs": [str(self.dir)],
        }
        spec = self._write_janitor_spec()
        self._janitor = subprocess.Popen(
            [sys.executable, "-m", janitor.__name__, str(spec)],
            start_new_session=True,  # outlives a SIGKILL of our process group
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )

    def _write_janitor_spec(self) -> Path:
        """Write (again) what the janitor must undo; it re-reads it when we die."""
        # Outside the run dir, which the janitor deletes; it deletes this file last.
        path = Path(tempfile.gettempdir()) / f"accord-janitor-{self.id}.json"
        self._cleanup["files"] = [str(path)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._cleanup))
        tmp.rename(path)  # never half-written when the janitor reads it
        return path

    def _issue(self, name: str, cn: str, orgs: tuple[str, ...] = ()) -> Path:
        assert self.cp is not None and self.cp.ca is not None
        pair = self.cp.ca.issue(cn, organizations=orgs, client=True)
        return self.cp.client_kubeconfig(name, pair.cert_pem, pair.key_pem)

    def _start_node(self, netns: str) -> None:
        assert self.dir is not None and self.cp is not None and self.cp.ca is not None
        d, b = self.dir, self.node_binaries
        pki = self.cp.dir / "pki"  # type: ignore[operator]
        serving = self.cp.ca.issue(NODE_NAME, hosts=(self.node_ip, NODE_NAME), server=True).write(
            d, "kubelet-serving"
        )
        kubelet_kc = self._issue("kubelet", f"system:node:{NODE_NAME}", ("system:nodes",))
        proxy_kc = self._issue("kube-proxy", "system:kube-proxy")
        cgroup_root = f"/accord-{self.id}"
        self._prepare_cgroups(cgroup_root)
        sock = d / "containerd.sock"
        (d / "cni").mkdir()
        (d / "cni" / "10-accord.conflist").write_text(json.dumps(self._cni_config()))
        (d / "containerd.toml").write_text(self._containerd_config(sock))
        (d / "kubelet.yaml").write_text(
            json.dumps(self._kubelet_config(sock, pki / "ca.crt", serving, cgroup_root))
        )
        (d / "kube-proxy.yaml").write_text(json.dumps(self._proxy_config(proxy_kc)))
        spec = {
            "path": b.path,
            "kernel_files": {
                path: value
                for path, value in _KERNEL_DEFAULTS.items()
                if Path(path).exists() and Path(path).read_text().strip() != value
            },
            "net_sysctls": {
                "net.ipv4.ip_forward": "1",
                "net.bridge.bridge-nf-call-iptables": "1",
                "net.ipv4.conf.all.route_localnet": "1",
            },
            "daemons": [
                {
                    "name": "containerd",
                    "argv": [str(b.containerd), f"--config={d / 'containerd.toml'}"],
                    "socket": str(sock),
                },
                {
                    "name": "kubelet",
                    "argv": [
                        str(b.kubelet),
                        f"--config={d / 'kubelet.yaml'}",
                        f"--kubeconfig={kubelet_kc}",
                        f"--root-dir={d / 'kubelet'}",
                        f"--node-ip={self.node_ip}",
                        f"--hostname-override={NODE_NAME}",
                        "--v=1",
                    ],
                },
                {
                    "name": "kube-proxy",
                    "argv": [str(b.kube_proxy), f"--config={d / 'kube-proxy.yaml'}", "--v=1"],
                },
            ],
        }
        (d / "node.json").write_text(json.dumps(spec))
        log = open(d / "nodeinit.log", "wb")  # noqa: SIM115 - closed below, kept by the child
        self._node = subprocess.Popen(
            [
                "nsenter",
                f"--net={netns}",
                "--",
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                sys.executable,
                "-m",
                "accord_operator.envtest.nodeinit",
                str(d / "node.json"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        log.close()
        self._cleanup["wait_pids"].append(self._node.pid)
        self._write_janitor_spec()
        deadline = time.monotonic() + 60
        while not (d / "nodeinit.ready").exists():
            if self._node.poll() is not None or time.monotonic() > deadline:
                raise NodeUnavailable(
                    f"the node did not start:\n{self.log_tail('nodeinit')}\n"
                    f"{self.log_tail('containerd')}"
                )
            time.sleep(0.05)

    def _prepare_cgroups(self, root: str) -> None:
        # The kubelet wants its cgroup root present in every hierarchy.
        for mount in _cgroup_mounts():
            child = mount / root.lstrip("/")
            child.mkdir(exist_ok=True)
            if (mount / "cpuset.cpus").exists():
                # A v1 cpuset child starts with no CPUs and no memory nodes: give it its parent's.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (child / knob).write_text((mount / knob).read_text())

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "accord",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni-ipam"),  # type: ignore[operator]
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _containerd_config(self, sock: Path) -> str:
        d, b = self.dir, self.node_binaries
        assert d is not None
        return f"""version = 3
root = '{d / "containerd" / "root"}'
state = '{d / "containerd" / "state"}'
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.tracing.processor.v1.otlp']

[grpc]
  address = '{sock}'

[ttrpc]
  address = '{sock}.ttrpc'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{pause_ref()}'

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  disable_apparmor = true
  enable_cdi = false
  # Without CAP_SYS_RESOURCE the pause container's oom_score_adj would be refused.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = '{b.runc}'
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{b.cni_dir}']
    conf_dir = '{d / "cni"}'
"""

    def _kubelet_config(
        self, sock: Path, ca: Path, serving: tuple[Path, Path], cgroup_root: str
    ) -> dict[str, Any]:
        assert self.dir is not None
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{sock}",
            "address": self.node_ip,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "protectKernelDefaults": False,
            "resolvConf": "",
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": CLUSTER_DOMAIN,
            "podLogsDir": str(self.dir / "pod-logs"),
            # Nothing can be pulled again here: never collect images, never evict for disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "0%",
                "imagefs.available": "0%",
                "nodefs.inodesFree": "0%",
            },
            "serializeImagePulls": False,
            "shutdownGracePeriod": "0s",
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "5s",
            "fileCheckFrequency": "0s",
            "maxPods": 110,
        }

    def _proxy_config(self, kubeconfig: Path) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "bindAddress": self.node_ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Leave the host's conntrack table alone: these knobs are global.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }

    def _start_scheduler_and_dns(self) -> None:
        assert self.cp is not None and self.dir is not None
        sched_kc = self._issue("kube-scheduler", "system:kube-scheduler")
        self.cp.spawn(
            "kube-scheduler",
            [
                str(self.node_binaries.kube_scheduler),
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=0",
            ],
        )
        # CoreDNS runs on the node (host network), behind the kube-dns Service as usual.
        dns_kc = self._issue("coredns", "accord:coredns")
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(_coredns_rbac()))
        corefile = self.dir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {dns_kc}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
"""
        )
        self.cp.spawn("coredns", [str(self.node_binaries.coredns), "-conf", str(corefile)])
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(_kube_dns(self.node_ip)))

    def _wait_node_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._node is not None and self._node.poll() is not None:
                break
            out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if out.returncode == 0:
                conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return
            time.sleep(0.2)
        raise NodeUnavailable(f"node {NODE_NAME} not Ready:\n{self.log_tail('kubelet', 40)}")

    def _pause_archive(self) -> Path:
        archive = cache_dir() / "pause.oci.tar"
        if not archive.exists():
            single_binary_image(self.node_binaries.pause, pause_ref(), archive)
        return archive

    def _import(self, archive: Path) -> None:
        assert self.dir is not None
        result = subprocess.run(
            [
                str(self.node_binaries.ctr),
                f"--address={self.dir / 'containerd.sock'}",
                "--namespace=k8s.io",
                "images",
                "import",
                "--no-unpack=false",
                str(archive),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ctr images import {archive} failed: {result.stderr}")

    def import_images(self, images: Iterable[Image]) -> None:
        """Load images built here (hack/build-images.sh) into the node's containerd."""
        for image in images:
            self._import(image.archive)
            self.images[image.name] = image

    def stop(self) -> None:
        for proc in (self._node, self._holder):
            if proc is not None and proc.poll() is None:
                proc.kill()  # the PID namespace and everything in it go with it
                proc.wait()
        if self.cp is not None:
            self.cp.stop()
        if self._cleanup:
            janitor.cleanup(self._cleanup)
        if self._janitor is not None and self._janitor.poll() is None:
            self._janitor.send_signal(signal.SIGTERM)
            self._janitor.wait()
        self._node = self._holder = self._janitor = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pause_ref() -> str:
    """The sandbox image's name: containerd pins it, nothing can pull it."""
    return f"localhost/accord/pause:{pinned_kubernetes_version()}"


def _coredns_rbac() -> dict[str, Any]:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "accord:coredns"},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["services", "pods", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "accord:coredns"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "accord:coredns",
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "accord:coredns"}
        ],
    }
    return {"apiVersion": "v1", "kind": "List", "items": [role, binding]}


def _kube_dns(node_ip: str) -> dict[str, Any]:
    ports = [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kube-dns",
            "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns"},
        },
        "spec": {"clusterIP": CLUSTER_DNS, "ports": ports},
    }
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kube-dns-node",
            "namespace": "kube-system",
            "labels": {
                "kubernetes.io/service-name": "kube-dns",
                "endpointslice.kubernetes.io/managed-by": "accord-envtest",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}}],
        "ports": ports,
    }
    return {"apiVersion": "v1", "kind": "List", "items": [service, endpoints]}
