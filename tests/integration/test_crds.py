"""The three CRDs on a real API server: installed, explained, examples in, bad input out."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.cluster import CRDS, EXAMPLES, Cluster, example

Obj = dict[str, Any]


def test_every_crd_is_established(cluster: Cluster) -> None:
    crds = json.loads(cluster.kubectl("get", "-f", str(CRDS), "-o", "json"))["items"]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "cqrsprojections.accord.dev",
        "sagaworkflows.accord.dev",
        "twophasetransactions.accord.dev",
    ]
    for crd in crds:
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True", crd["metadata"]["name"]
        assert conditions["NamesAccepted"] == "True", crd["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_applies_and_is_stored_as_written(
    cluster: Cluster, namespace: str, name: str
) -> None:
    doc = example(name)
    stored = cluster.apply(doc, namespace)
    # The API server adds defaults; everything the user wrote must still be there.
    for key, value in doc["spec"].items():
        if not isinstance(value, (dict, list)):
            assert stored["spec"][key] == value, key
        assert key in stored["spec"], key


def test_kubectl_get_accord_lists_every_kind(cluster: Cluster, namespace: str) -> None:
    for name in ("saga-order.yaml", "tpc-transfer.yaml", "projection-orders.yaml"):
        cluster.apply(example(name), namespace)
    out = cluster.kubectl("get", "accord", "-n", namespace)
    assert "sagaworkflow.accord.dev/order-1001" in out
    assert "twophasetransaction.accord.dev/transfer-5001" in out
    assert "cqrsprojection.accord.dev/orders-by-customer" in out
    for short in ("saga", "tpc", "proj"):
        assert "NAME" in cluster.kubectl("get", short, "-n", namespace)


def test_kubectl_explain_reads_well(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "sagaworkflow.spec.steps")
    assert "The steps, in order." in out
    for field in ("action", "compensation", "dependsOn", "retry", "timeoutSeconds", "compensable"):
        assert f"{field}\t" in out or f"{field} " in out, field
    assert "marks the pivot step" in out
    assert "Names of earlier steps" in out
    deep = cluster.kubectl("explain", "sagaworkflow.spec.steps.retry.backoff.multiplier")
    assert "Factor applied to the delay" in deep
    assert "two-phase commit" in cluster.kubectl("explain", "twophasetransaction")
    assert "rebuild the read model" in cluster.kubectl(
        "explain", "cqrsprojection.spec.rebuildGeneration"
    )


# -- refusals ------------------------------------------------------------------------------


def _saga(**spec: Any) -> Obj:
    base: Obj = {
        "apiVersion": "accord.dev/v1alpha1",
        "kind": "SagaWorkflow",
        "metadata": {"name": "bad"},
        "spec": {
            "steps": [
                {
                    "name": "reserve",
                    "action": {"http": {"service": "inventory", "path": "/reserve"}},
                },
                {"name": "charge", "action": {"http": {"service": "payment", "path": "/charge"}}},
            ]
        },
    }
    base["spec"].update(spec)
    return base


def _step(obj: Obj, i: int) -> Obj:
    step: Obj = obj["spec"]["steps"][i]
    return step


def _mutate(base: Obj, change: Callable[[Obj], None]) -> Obj:
    obj = copy.deepcopy(base)
    change(obj)
    return obj


_TPC: Obj = example("tpc-transfer.yaml")
_PROJ: Obj = example("projection-orders.yaml")
_SAGA = _saga()


def _many_steps(o: Obj) -> None:
    o["spec"]["steps"] = [
        {"name": f"s{i}", "action": {"http": {"service": "svc", "path": "/x"}}} for i in range(33)
    ]


INVALID: list[tuple[str, Obj, list[str]]] = [
    (
        "saga-no-steps",
        _mutate(_SAGA, lambda o: o["spec"].pop("steps")),
        ["spec.steps: Required value"],
    ),
    ("saga-empty-steps", _saga(steps=[]), ["spec.steps", "at least 1 items"]),
    ("saga-too-many-steps", _mutate(_SAGA, _many_steps), ["spec.steps", "at most 32 items"]),
    (
        "saga-step-without-action",
        _mutate(_SAGA, lambda o: _step(o, 0).pop("action")),
        ["spec.steps[0].action: Required value"],
    ),
    (
        "saga-action-http-and-job",
        _mutate(_SAGA, lambda o: _step(o, 0)["action"].update(job={"image": "busybox"})),
        ["spec.steps[0].action", "exactly one of http or job must be set"],
    ),
    (
        "saga-action-empty",
        _mutate(_SAGA, lambda o: _step(o, 1).update(action={})),
        ["spec.steps[1].action", "exactly one of http or job must be set"],
    ),
    (
        "saga-duplicate-step-names",
        _mutate(_SAGA, lambda o: _step(o, 1).update(name="reserve")),
        ["spec.steps[1]: Duplicate value"],
    ),
    (
        "saga-depends-on-unknown-step",
        _mutate(_SAGA, lambda o: _step(o, 1).update(dependsOn=["nope"])),
        ["spec.steps", 'step "charge" dependsOn "nope", which is not a step in spec.steps'],
    ),
    (
        "saga-depends-on-later-step",
        _mutate(_SAGA, lambda o: _step(o, 0).update(dependsOn=["charge"])),
        ["spec.steps", 'step "reserve" dependsOn "charge", which is not listed before it'],
    ),
    (
        "saga-depends-on-itself",
        _mutate(_SAGA, lambda o: _step(o, 0).update(dependsOn=["reserve"])),
        ["spec.steps[0].dependsOn", "must not depend on itself"],
    ),
    (
        "saga-zero-attempts",
        _mutate(_SAGA, lambda o: _step(o, 0).update(retry={"maxAttempts": 0})),
        ["spec.steps[0].retry.maxAttempts", "greater than or equal to 1"],
    ),
    (
        "saga-oversize-attempts",
        _mutate(_SAGA, lambda o: _step(o, 0).update(retry={"maxAttempts": 1000})),
        ["spec.steps[0].retry.maxAttempts", "less than or equal to 100"],
    ),
    (
        "saga-backoff-max-below-initial",
        _mutate(
            _SAGA,
            lambda o: _step(o, 0).update(
                retry={"backoff": {"initialSeconds": 10, "maxSeconds": 1}}
            ),
        ),
        ["spec.steps[0].retry.backoff.maxSeconds", "must be at least backoff.initialSeconds"],
    ),
    (
        "saga-negative-timeout",
        _saga(timeoutSeconds=-5),
        ["spec.timeoutSeconds", "greater than or equal to 1"],
    ),
    ("saga-timeout-wrong-type", _saga(timeoutSeconds="ten"), ["spec.timeoutSeconds", "integer"]),
    (
        "saga-step-name-not-dns",
        _mutate(_SAGA, lambda o: _step(o, 0).update(name="Reserve_Stock")),
        ["spec.steps[0].name", "should match"],
    ),
    (
        "saga-unsupported-method",
        _mutate(_SAGA, lambda o: _step(o, 0)["action"]["http"].update(method="GET")),
        ["spec.steps[0].action.http.method", 'Unsupported value: "GET"'],
    ),
    (
        "saga-relative-path",
        _mutate(_SAGA, lambda o: _step(o, 0)["action"]["http"].update(path="reserve")),
        ["spec.steps[0].action.http.path", "should match"],
    ),
    (
        # A CR or LF would end the participant's request line; never silently stripped.
        "saga-path-with-newline",
        _mutate(_SAGA, lambda o: _step(o, 0)["action"]["http"].update(path="/reserve\r\nX: 1")),
        ["spec.steps[0].action.http.path", "should match"],
    ),
    (
        "saga-job-bad-service-account",
        _mutate(
            _SAGA,
            lambda o: _step(o, 0).update(
                action={"job": {"image": "i", "serviceAccountName": "A B"}}
            ),
        ),
        ["spec.steps[0].action.job.serviceAccountName", "should match"],
    ),
    (
        "saga-pivot-with-compensation",
        _mutate(
            _SAGA,
            lambda o: _step(o, 0).update(
                compensable=False,
                compensation={"http": {"service": "inventory", "path": "/release"}},
            ),
        ),
        ["spec.steps[0].compensation", "pivot step"],
    ),
    (
        "saga-unknown-field",
        _mutate(_SAGA, lambda o: _step(o, 0).update(retries=3)),
        ['unknown field "spec.steps[0].retries"'],
    ),
    (
        "tpc-no-participants",
        _mutate(_TPC, lambda o: o["spec"].pop("participants")),
        ["spec.participants: Required value"],
    ),
    (
        "tpc-duplicate-participants",
        _mutate(_TPC, lambda o: o["spec"]["participants"][1].update(name="debit")),
        ["spec.participants[1]: Duplicate value"],
    ),
    (
        "tpc-zero-prepare-timeout",
        _mutate(_TPC, lambda o: o["spec"].update(prepareTimeoutSeconds=0)),
        ["spec.prepareTimeoutSeconds", "greater than or equal to 1"],
    ),
    (
        "tpc-port-out-of-range",
        _mutate(_TPC, lambda o: o["spec"]["participants"][0].update(port=70000)),
        ["spec.participants[0].port", "less than or equal to 65535"],
    ),
    (
        "proj-more-replicas-than-partitions",
        _mutate(_PROJ, lambda o: o["spec"].update(replicas=8, partitions=2)),
        ["spec.replicas", "must not exceed partitions"],
    ),
    (
        "proj-topic-with-space",
        _mutate(_PROJ, lambda o: o["spec"]["source"].update(topic="orders events")),
        ["spec.source.topic", "should match"],
    ),
    (
        "proj-bad-start",
        _mutate(_PROJ, lambda o: o["spec"]["source"].update(startFrom="Yesterday")),
        ["spec.source.startFrom", 'Unsupported value: "Yesterday"'],
    ),
    (
        "proj-projector-without-image",
        _mutate(_PROJ, lambda o: o["spec"]["projector"].pop("image")),
        ["spec.projector.image: Required value"],
    ),
    (
        "proj-negative-rebuild",
        _mutate(_PROJ, lambda o: o["spec"].update(rebuildGeneration=-1)),
        ["spec.rebuildGeneration", "greater than or equal to 0"],
    ),
]


@pytest.mark.parametrize(("case", "obj", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_resource_is_refused_naming_the_field(
    cluster: Cluster, namespace: str, case: str, obj: Obj, expected: list[str]
) -> None:
    obj = copy.deepcopy(obj)
    obj["metadata"]["name"] = case
    code, err = cluster.try_apply(obj, namespace)
    assert code != 0, f"{case} was accepted"
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert not cluster.exists(obj["kind"], case, namespace), f"{case} was stored"


def test_two_phase_spec_cannot_change_after_creation(cluster: Cluster, namespace: str) -> None:
    tpc = cluster.apply(example("tpc-transfer.yaml"), namespace)
    changed = _mutate(
        example("tpc-transfer.yaml"), lambda o: o["spec"].update(prepareTimeoutSeconds=99)
    )
    code, err = cluster.try_apply(changed, namespace)
    assert code != 0 and "spec is immutable" in err
    assert cluster.get("tpc", "transfer-5001", namespace)["spec"] == tpc["spec"]


def test_rebuild_generation_only_grows(cluster: Cluster, namespace: str) -> None:
    proj = example("projection-orders.yaml")
    cluster.apply(_mutate(proj, lambda o: o["spec"].update(rebuildGeneration=3)), namespace)
    code, err = cluster.try_apply(
        _mutate(proj, lambda o: o["spec"].update(rebuildGeneration=2)), namespace
    )
    assert code != 0 and "spec.rebuildGeneration" in err and "may only grow" in err
    cluster.apply(_mutate(proj, lambda o: o["spec"].update(rebuildGeneration=4)), namespace)
    assert cluster.get("proj", "orders-by-customer", namespace)["spec"]["rebuildGeneration"] == 4
