"""The in-cluster suite: one list of scenarios, run on every cluster provider that this
machine can start. The real node runs wherever root and the kernel allow it (here and in
CI); kind only where a Docker engine runs."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.e2e.providers import E2ECluster, docker_missing, kind_cluster, node_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session", params=["node", "kind"])
def k8s(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2ECluster]:
    if request.param == "kind":
        why = docker_missing()
        if why is not None:
            kind_needs = f"kind needs a Docker engine: {why}"
            pytest.skip(f"{kind_needs} (the same scenarios ran on the real node)")
        with kind_cluster(tmp_path_factory.mktemp("kind")) as cluster:
            yield cluster
        return
    # The real node needs root and a few kernel features; NodeUnavailable names what is
    # missing. It fails the suite rather than skipping: where it cannot run, fix the machine.
    with node_cluster() as cluster:
        yield cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, Any, Any]:
    report = yield
    # A failed scenario says what the cluster looked like (CI has no shell to look with).
    if report.failed and call.when in ("setup", "call"):
        cluster = getattr(item, "funcargs", {}).get("k8s")
        if isinstance(cluster, E2ECluster):
            report.sections.append(("cluster state", cluster.diagnose()))
    return report
