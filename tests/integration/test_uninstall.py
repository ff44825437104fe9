"""accord-operator uninstall (the chart's pre-delete hook) on the real API server: every
Accord resource goes, and one the controller does not finalize in time loses its finalizer
instead of holding its namespace forever."""

from __future__ import annotations

from accord_operator.kubeapi import KubeApi
from accord_operator.uninstall import FINALIZERS, uninstall
from tests.support.cluster import Cluster, example


async def test_uninstall_deletes_everything_and_unblocks_what_nobody_finalizes(
    cluster: Cluster, namespace: str
) -> None:
    held = example("saga-order.yaml")
    # No controller runs here: this finalizer would never be removed by anyone else.
    held["metadata"]["finalizers"] = list(FINALIZERS)  # an old operator's, and ours
    cluster.apply(held, namespace)
    cluster.apply(example("tpc-transfer.yaml"), namespace)

    api = KubeApi(str(cluster.kubeconfig))
    try:
        leftovers = await uninstall(api, (namespace,), timeout_s=2)
    finally:
        await api.close()

    assert [(o.kind.kind, o.name) for o in leftovers] == [("SagaWorkflow", "order-1001")]
    for kind in ("saga", "tpc", "proj"):
        assert cluster.kubectl("get", kind, "-n", namespace, "-o", "name").strip() == ""
