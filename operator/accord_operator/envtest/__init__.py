"""A real local Kubernetes control plane (etcd + kube-apiserver) for tests and the demo.

Follows controller-runtime's envtest: binaries come from KUBEBUILDER_ASSETS, PATH, a cache
outside the repo, or are built from pinned releases; everything listens on loopback.
"""

from accord_operator.envtest.binaries import Binaries, find_binaries
from accord_operator.envtest.controlplane import ControlPlane


def local_service(name: str) -> dict[str, object]:
    """A Service that resolves to this machine: how local runs reach participant processes."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": "ExternalName", "externalName": "localhost"},
    }


__all__ = ["Binaries", "ControlPlane", "find_binaries", "local_service"]
