"""Install CRDs into a control plane and wait until the API server serves them."""

from __future__ import annotations

from pathlib import Path

from accord_operator.envtest.controlplane import ControlPlane


def install_crds(cp: ControlPlane, directory: Path, timeout: int = 60) -> list[str]:
    """Server-side apply every CRD in directory; return their names once Established."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRDs in {directory}")
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=accord-envtest"]
    for f in files:
        args += ["-f", str(f)]
    cp.kubectl(*args)
    names = cp.kubectl("get", "-f", str(directory), "-o", "name").stdout.split()
    cp.kubectl("wait", "--for=condition=Established", f"--timeout={timeout}s", *names)
    return names
