"""Find (or build) etcd, kube-apiserver, kube-controller-manager and kubectl."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
HACK = REPO_ROOT / "hack"
NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    source: str  # where they were found: KUBEBUILDER_ASSETS, PATH, cache or build


def pinned_kubernetes_version() -> str:
    """The release pinned in hack/k8s/go.mod, the one place it lives."""
    for line in (HACK / "k8s" / "go.mod").read_text().splitlines():
        words = line.split()
        if words[:2] == ["require", "k8s.io/kubernetes"]:
            return words[2]
    raise RuntimeError("hack/k8s/go.mod does not require k8s.io/kubernetes")


def cache_dir(version: str | None = None) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "accord" / "k8s" / (version or pinned_kubernetes_version())


def _from_dir(directory: Path, source: str) -> Binaries | None:
    paths = [directory / name for name in NAMES]
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return _binaries(paths, source)
    return None


def _binaries(paths: list[Path], source: str) -> Binaries:
    etcd, apiserver, controller_manager, kubectl = paths
    return Binaries(etcd, apiserver, controller_manager, kubectl, source=source)


def _from_path() -> Binaries | None:
    found = [shutil.which(name) for name in NAMES]
    if all(found):
        return _binaries([Path(p) for p in found if p], "PATH")
    return None


def find_binaries(build: bool = True) -> Binaries:
    """KUBEBUILDER_ASSETS, then PATH, then the cache; else build from pinned releases.

    A partial directory does not count: mixing binaries from two places would run an
    apiserver against a kubectl of another release without anyone noticing.
    """
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found = _from_dir(Path(assets), "KUBEBUILDER_ASSETS")
        if found is None:
            raise RuntimeError(f"KUBEBUILDER_ASSETS={assets} lacks one of {', '.join(NAMES)}")
        return found
    found = _from_path() or _from_dir(cache_dir(), "cache")
    if found is not None:
        return found
    if not build:
        raise RuntimeError(f"control-plane binaries not found; run {HACK / 'build-binaries.sh'}")
    subprocess.run([str(HACK / "build-binaries.sh")], check=True, stdout=subprocess.DEVNULL)
    found = _from_dir(cache_dir(), "build")
    if found is None:
        raise RuntimeError("hack/build-binaries.sh finished but the cache is incomplete")
    return found


def find_helm(build: bool = True) -> Path:
    """helm: PATH, then the cache, else built from the release pinned in hack/helm/go.mod."""
    found = shutil.which("helm")
    if found:
        return Path(found)
    cached = cache_dir() / "helm"
    if not cached.exists() and build:
        subprocess.run([str(HACK / "build-binaries.sh")], check=True, stdout=subprocess.DEVNULL)
    if not cached.exists():
        raise RuntimeError(f"helm not found; run {HACK / 'build-binaries.sh'}")
    return cached
