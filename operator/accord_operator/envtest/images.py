"""Accord's own images, built here from their Dockerfiles (hack/build-images.sh: buildah on
a base made with debootstrap, content-hash cached) as OCI archives for a real node."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from accord_operator.envtest.binaries import HACK

NAMES = ("operator", "sidecar", "samples", "nats")


@dataclass(frozen=True)
class Image:
    name: str  # operator, sidecar, samples or nats
    ref: str  # localhost/accord/<name>:<content hash>
    archive: Path

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.rsplit(":", 1)[1]


def build_images(*names: str) -> dict[str, Image]:
    """Build (or take from the cache) the named images, all three by default."""
    result = subprocess.run(
        [str(HACK / "build-images.sh"), *(names or NAMES)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"hack/build-images.sh failed:\n{result.stderr[-3000:]}")
    images = {}
    for line in result.stdout.splitlines():
        name, ref, archive = line.split()
        images[name] = Image(name, ref, Path(archive))
    return images
