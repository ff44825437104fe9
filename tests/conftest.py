"""Session fixtures: one real control plane per test session, one namespace per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.support.cluster import CRDS, Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    from accord_operator.envtest import ControlPlane
    from accord_operator.envtest.crds import install_crds

    with ControlPlane() as cp:
        install_crds(cp, CRDS)
        yield Cluster(cp)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
