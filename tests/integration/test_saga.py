"""SagaWorkflow on the real API server, with real participant processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, example
from tests.support.operator import run_operator
from tests.support.saga import SagaBed, saga_bed, slow_fenced_participant, step


@pytest.fixture
def bed(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[SagaBed]:
    with saga_bed(cluster, namespace, tmp_path, "inventory", "payment", "shipping") as b:
        yield b


ORDER = [
    step("reserve", "inventory", "reserve", "release"),
    step("charge", "payment", "charge", "refund"),
    step("ship", "shipping", "ship", "recall"),
]


def test_happy_path(bed: SagaBed) -> None:
    bed.apply(bed.saga("order-1", ORDER, input={"orderId": "1"}))
    saga = bed.wait("order-1", "Succeeded")
    status = saga["status"]
    assert (
        status["progress"] == "3/3" and [s["phase"] for s in status["steps"]] == ["Succeeded"] * 3
    )
    assert status["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }
    # Tools that read kstatus conditions see it done.
    bed.cluster.kubectl(
        "wait", "saga/order-1", "-n", bed.namespace, "--for=condition=Ready", "--timeout=10s"
    )
    assert bed.calls("inventory") == ["reserve"] and bed.calls("shipping") == ["ship"]
    # The wire contract: input, earlier outputs, saga/step headers and a stable key.
    (ship,) = bed.services["shipping"].calls()
    assert ship["body"]["input"] == {"orderId": "1"}
    assert set(ship["body"]["outputs"]) == {"reserve", "charge"}
    assert ship["headers"]["Accord-Saga"] == f"{bed.namespace}/order-1"
    assert ship["headers"]["Accord-Step"] == "ship"
    assert ship["headers"]["Accord-Idempotency-Key"] == f"{saga['metadata']['uid']}/ship/action"
    assert status["steps"][0]["output"]["service"] == "inventory"
    table = bed.cluster.kubectl("get", "saga", "-n", bed.namespace)
    assert "order-1" in table and "Succeeded" in table and "3/3" in table
    assert ("Normal", "Succeeded") in bed.events("order-1")


def test_failure_at_payment_compensates_inventory(bed: SagaBed) -> None:
    bed.services["payment"].behave(
        {"path": "/charge", "status": 402, "body": {"error": "declined"}}
    )
    bed.apply(bed.saga("order-2", ORDER))
    status = bed.wait("order-2", "Compensated")["status"]
    assert bed.calls("inventory") == ["reserve", "release"]
    assert bed.calls("payment") == ["charge"]  # a business refusal is not retried
    assert bed.calls("shipping") == []
    assert [s["phase"] for s in status["steps"]] == ["Compensated", "Failed", "Skipped"]
    assert "HTTP 402" in status["steps"][1]["lastError"]
    assert ("Warning", "Compensating") in bed.events("order-2")


def test_events_come_from_accord_operator_in_the_order_they_happened(bed: SagaBed) -> None:
    bed.services["payment"].behave({"path": "/charge", "status": 402})
    bed.apply(bed.saga("told", ORDER))
    bed.wait("told", "Compensated")
    expected = ["Running", "StepFailed", "Compensating", "Compensated"]
    deadline = time.monotonic() + 30
    while len(events := bed.event_objects("told")) < len(expected):
        assert time.monotonic() < deadline, [e["reason"] for e in events]
        time.sleep(0.3)
    assert [e["reason"] for e in events] == expected
    assert {e["source"].get("component") or e.get("reportingComponent") for e in events} == {
        "accord-operator"
    }


def test_failure_at_step_k_compensates_k_minus_1_to_1_in_order(bed: SagaBed) -> None:
    steps = [step(f"s{i}", "inventory", f"do-{i}", f"undo-{i}") for i in range(1, 5)]
    bed.services["inventory"].behave({"path": "/do-4", "status": 400})
    bed.apply(bed.saga("long", steps))
    bed.wait("long", "Compensated")
    assert bed.calls("inventory") == ["do-1", "do-2", "do-3", "do-4", "undo-3", "undo-2", "undo-1"]


def test_server_errors_are_retried_then_succeed(bed: SagaBed) -> None:
    bed.services["payment"].behave({"path": "/charge", "fail": 2, "status": 503})
    bed.apply(bed.saga("order-3", ORDER))
    status = bed.wait("order-3", "Succeeded")["status"]
    assert bed.calls("payment") == ["charge"] * 3
    assert status["steps"][1]["attempts"] == 3
    keys = {c["headers"]["Accord-Idempotency-Key"] for c in bed.services["payment"].calls()}
    assert len(keys) == 1  # every retry under the same key


def test_step_timeout_is_a_failure_and_saga_timeout_compensates(bed: SagaBed) -> None:
    bed.services["payment"].behave({"path": "/charge", "delayMs": 3000})
    steps = [
        ORDER[0],
        {
            **ORDER[1],
            "timeoutSeconds": 1,
            "retry": {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1}},
        },
        ORDER[2],
    ]
    bed.apply(bed.saga("slow", steps))
    status = bed.wait("slow", "Compensated")["status"]
    assert "no answer within 1s" in status["steps"][1]["lastError"]
    # The charge may have happened after all (no answer is not a no): it is undone too.
    assert bed.calls("payment")[:2] == ["charge", "charge"] and "refund" in bed.calls("payment")
    assert bed.calls("inventory") == ["reserve", "release"]

    bed.services["shipping"].behave({"path": "/ship", "status": 503})
    steps = [
        ORDER[0],
        ORDER[1],
        {**ORDER[2], "retry": {"maxAttempts": 100, "backoff": {"initialSeconds": 0.2}}},
    ]
    bed.services["payment"].behave()
    bed.apply(bed.saga("deadline", steps, timeoutSeconds=3))
    status = bed.wait("deadline", "Compensated")["status"]
    assert "timed out after 3s" in status["message"]


def test_parallel_branches(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/book-flight", "delayMs": 700})
    bed.services["shipping"].behave({"path": "/book-hotel", "delayMs": 700})
    steps = [
        step("flight", "inventory", "book-flight", "cancel-flight", dependsOn=[]),
        step("hotel", "shipping", "book-hotel", "cancel-hotel", dependsOn=[]),
        step("charge", "payment", "charge", "refund", dependsOn=["flight", "hotel"]),
    ]
    bed.apply(bed.saga("trip", steps))
    status = bed.wait("trip", "Succeeded")["status"]
    flight, hotel, charge = status["steps"]
    # Both branches were running at the same time, and the join waited for both.
    assert flight["startedAt"] < hotel["finishedAt"] and hotel["startedAt"] < flight["finishedAt"]
    assert charge["startedAt"] >= max(flight["finishedAt"], hotel["finishedAt"])


def test_a_slow_branch_does_not_hold_up_an_independent_one(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/slow", "delayMs": 4000})
    steps = [
        step("slow", "inventory", "slow", "undo-slow", dependsOn=[], timeoutSeconds=30),
        step("fast", "shipping", "fast", "undo-fast", dependsOn=[]),
        step("after-fast", "payment", "next", "undo-next", dependsOn=["fast"]),
    ]
    bed.apply(bed.saga("branches", steps))
    status = bed.wait("branches", "Succeeded")["status"]
    slow, _, after = status["steps"]
    # The step after the fast branch ran while the slow call was still in flight.
    assert after["startedAt"] < slow["finishedAt"] and after["finishedAt"] < slow["finishedAt"]


def test_pivot_goes_forward(bed: SagaBed) -> None:
    bed.services["shipping"].behave({"path": "/ship", "fail": 4, "status": 503})
    steps = [
        ORDER[0],
        {
            "name": "charge",
            "compensable": False,
            "action": {"http": {"service": "payment", "path": "/charge"}},
        },
        {
            **ORDER[2],
            "retry": {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.2}},
        },
    ]
    bed.apply(bed.saga("pivot", steps))
    bed.wait("pivot", "Succeeded")
    assert bed.calls("shipping") == ["ship"] * 5  # past maxAttempts: forward recovery
    assert "release" not in bed.calls("inventory")


PIVOT_ORDER = [
    ORDER[0],
    {"name": "charge", "compensable": False,
     "action": {"http": {"service": "payment", "path": "/charge"}}},
    ORDER[2],
]  # fmt: skip


def test_a_redrive_after_a_refusal_reaches_the_participant_again(bed: SagaBed) -> None:
    """The participant deduplicates (like the sidecar): the same key would only replay its
    stored 400. A definitive refusal means nothing happened, so the redrive sends a new key."""
    bed.services["shipping"].behave({"path": "/ship", "status": 400, "body": {"error": "address"}})
    bed.apply(bed.saga("refused", PIVOT_ORDER))
    assert "HTTP 400" in bed.wait("refused", "Failed")["status"]["message"]
    bed.services["shipping"].behave()  # the address is fixed
    bed.cluster.kubectl(
        "annotate", "saga", "refused", "-n", bed.namespace, "accord.dev/redrive=fixed"
    )
    saga = bed.wait("refused", "Succeeded")
    assert bed.calls("shipping") == ["ship", "ship"]  # executed again, not replayed
    keys = [c["headers"]["Accord-Idempotency-Key"] for c in bed.services["shipping"].calls()]
    uid = saga["metadata"]["uid"]
    assert keys == [f"{uid}/ship/action", f"{uid}/ship/action/r1"]
    assert saga["status"]["steps"][2]["keyGeneration"] == 1
    assert saga["status"]["cause"].startswith("step ship after the pivot was refused: HTTP 400")


def test_a_replayed_answer_is_recorded_in_the_step(bed: SagaBed) -> None:
    bed.services["payment"].behave({"path": "/charge", "delayMs": 1500, "fail": 1})
    # The first attempt gives up after 1 s; the participant finishes it at 1.5 s; the retry
    # comes 2 s later, under the same key, and gets the stored answer.
    retry = {"maxAttempts": 3, "backoff": {"initialSeconds": 2, "maxSeconds": 2}, "jitter": 0}
    steps = [ORDER[0], {**ORDER[1], "timeoutSeconds": 1, "retry": retry}, ORDER[2]]
    bed.apply(bed.saga("replayed", steps))
    status = bed.wait("replayed", "Succeeded")["status"]
    # The first attempt timed out but was executed; the retry got the stored answer.
    assert [c.get("replayed", False) for c in bed.services["payment"].calls()][-1] is True
    assert status["steps"][1]["replayed"] is True


def test_a_call_in_flight_is_cut_at_the_saga_deadline(bed: SagaBed) -> None:
    bed.services["payment"].behave({"path": "/charge", "delayMs": 30_000})
    steps = [ORDER[0], {**ORDER[1], "timeoutSeconds": 60}, ORDER[2]]
    bed.apply(bed.saga("deadline", steps, timeoutSeconds=2))
    status = bed.wait("deadline", "Compensated")["status"]
    charge = status["steps"][1]
    # Cut at the saga's deadline (2 s from the start), not at the step's 60 s.
    assert "no answer within" in charge["lastError"]
    assert float(charge["lastError"].split("within ")[1].split("s")[0]) <= 2
    assert "timed out" in status["cause"] and bed.calls("inventory") == ["reserve", "release"]


def test_deleting_a_saga_waits_while_its_compensation_fails(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/release", "status": 422})
    bed.services["payment"].behave({"path": "/charge", "status": 402})
    bed.apply(bed.saga("holding", ORDER))
    bed.wait("holding", "Failed")
    bed.cluster.kubectl("delete", "saga", "holding", "-n", bed.namespace, "--wait=false")
    deadline = time.monotonic() + 60
    while ("Warning", "DeletionWaits") not in bed.events("holding"):
        assert time.monotonic() < deadline, bed.events("holding")
        time.sleep(0.5)
    held = bed.cluster.get("saga", "holding", bed.namespace)  # still there: it holds stock
    assert held["metadata"].get("deletionTimestamp") and held["metadata"]["finalizers"]
    assert "compensation of step reserve failed" in held["status"]["message"]
    # Fixed, redriven: the compensation runs, then the saga goes.
    bed.services["inventory"].behave()
    bed.cluster.kubectl(
        "annotate", "saga", "holding", "-n", bed.namespace, "accord.dev/redrive=fixed"
    )
    bed.cluster.kubectl(
        "wait", "--for=delete", "saga/holding", "-n", bed.namespace, "--timeout=90s"
    )
    assert bed.calls("inventory") == ["reserve", "release", "release"]


def test_a_saga_that_holds_something_is_deleted_when_told_to_skip(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/release", "status": 422})
    bed.services["payment"].behave({"path": "/charge", "status": 402})
    bed.apply(bed.saga("abandon", ORDER))
    bed.wait("abandon", "Failed")
    bed.cluster.kubectl("delete", "saga", "abandon", "-n", bed.namespace, "--wait=false")
    bed.cluster.kubectl(
        "annotate", "saga", "abandon", "-n", bed.namespace, "accord.dev/skip-compensation=true"
    )
    bed.cluster.kubectl(
        "wait", "--for=delete", "saga/abandon", "-n", bed.namespace, "--timeout=90s"
    )


def test_an_action_that_lands_after_its_compensation_is_fenced_by_the_sidecar(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The payment participant sits behind a real sidecar, behind a slow link that holds
    /charge for 6 s and delivers it even after the operator gave up. Both attempts time out,
    the saga compensates (the refund arrives first, with nothing to undo), and then the
    charges land. The sidecar's fence refuses them: the app never charges."""
    with (
        saga_bed(cluster, namespace, tmp_path, "inventory", "payment", operator=False) as bed,
        slow_fenced_participant(bed, "payment", tmp_path, "/charge=6000") as payment,
    ):
        app = bed.services["payment"]
        quick = {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.2}}
        charge = step("charge", "payment", "charge", "refund", timeoutSeconds=1, retry=quick)
        steps = [ORDER[0], payment.via(charge)]
        env = {"ACCORD_PARTICIPANT_TOKEN": payment.token}
        with run_operator(cluster, tmp_path, "--controller-only", "-n", namespace, env=env):
            bed.apply(bed.saga("late", steps))
            saga = bed.wait("late", "Compensated")
            # Both held charges get through the link (6 s each) and reach the sidecar.
            deadline = time.monotonic() + 30
            while payment.sidecar.metric("accord_sidecar_fenced_total") < 2:
                assert time.monotonic() < deadline, "the late charges never arrived"
                time.sleep(0.3)
        assert [c["path"] for c in app.calls()] == ["/refund"]  # never charged
        assert saga["status"]["steps"][1]["outcomeUnknown"] is True
        assert bed.calls("inventory") == ["reserve", "release"]


def test_a_finished_saga_keeps_no_finalizer(bed: SagaBed) -> None:
    # Nothing is held and nothing will run: deleting it, or its namespace, must never wait
    # on a controller (which may be gone, e.g. after helm uninstall).
    bed.apply(bed.saga("finished", ORDER))
    bed.wait("finished", "Succeeded")
    bed.cluster.wait_for(
        "saga", "finished", bed.namespace,
        lambda s: not [f for f in s["metadata"].get("finalizers") or [] if "accord" in f],
    )  # fmt: skip


def test_finished_sagas_past_their_ttl_are_deleted_failed_ones_kept(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/release", "status": 500})
    bed.apply(bed.saga("short-lived", ORDER, ttlSecondsAfterFinished=1))
    bed.apply(bed.saga("kept", ORDER))  # no TTL: kept
    failing = [ORDER[0], step("charge", "payment", "charge-declined", "refund")]
    bed.services["payment"].behave({"path": "/charge-declined", "status": 402})
    bed.apply(bed.saga("held", failing, ttlSecondsAfterFinished=0))  # Failed: kept
    bed.wait("kept", "Succeeded")
    bed.wait("held", "Failed")
    deadline = time.monotonic() + 60
    while bed.cluster.exists("saga", "short-lived", bed.namespace):
        assert time.monotonic() < deadline, "a finished saga outlived its TTL by a minute"
        time.sleep(0.5)
    assert bed.calls("shipping", "short-lived") == ["ship"]  # it did finish first
    time.sleep(6)  # a sweep or more
    assert bed.cluster.exists("saga", "kept", bed.namespace)
    assert bed.cluster.exists("saga", "held", bed.namespace)


def test_spec_is_immutable_once_started(bed: SagaBed) -> None:
    saga = bed.saga("frozen", ORDER)
    bed.apply(saga)
    bed.wait("frozen", "Succeeded")
    saga["spec"]["steps"][0]["action"]["http"]["path"] = "/other"
    code, err = bed.cluster.try_apply(saga, bed.namespace)
    assert code != 0 and "spec is immutable once the saga has started" in err
    assert "<nil>" not in err and "spec: Forbidden" in err  # the field is named


def test_deleting_a_running_saga_compensates_first(bed: SagaBed) -> None:
    bed.services["shipping"].behave({"path": "/ship", "status": 503})
    steps = [
        ORDER[0],
        ORDER[1],
        {**ORDER[2], "retry": {"maxAttempts": 100, "backoff": {"initialSeconds": 0.3}}},
    ]
    bed.apply(bed.saga("doomed", steps))
    bed.cluster.wait_for(
        "saga",
        "doomed",
        bed.namespace,
        lambda o: (o.get("status") or {}).get("currentStep") == "ship",
    )
    bed.cluster.kubectl(
        "delete", "saga", "doomed", "-n", bed.namespace, "--wait=true", "--timeout=60s"
    )
    assert bed.calls("inventory") == ["reserve", "release"]
    assert bed.calls("payment") == ["charge", "refund"]
    assert not bed.cluster.exists("saga", "doomed", bed.namespace)


def test_delete_with_skip_compensation(bed: SagaBed) -> None:
    bed.services["shipping"].behave({"path": "/ship", "status": 503})
    steps = [
        ORDER[0],
        {**ORDER[2], "retry": {"maxAttempts": 100, "backoff": {"initialSeconds": 0.3}}},
    ]
    saga = bed.saga("abandoned", steps)
    saga["metadata"]["annotations"] = {"accord.dev/skip-compensation": "true"}
    bed.apply(saga)
    bed.cluster.wait_for(
        "saga",
        "abandoned",
        bed.namespace,
        lambda o: (o.get("status") or {}).get("currentStep") == "ship",
    )
    bed.cluster.kubectl(
        "delete", "saga", "abandoned", "-n", bed.namespace, "--wait=true", "--timeout=60s"
    )
    assert bed.calls("inventory") == ["reserve"]


def test_failed_compensation_then_redrive(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/release", "status": 500})
    bed.services["payment"].behave({"path": "/charge", "status": 402})
    bed.apply(bed.saga("stuck", ORDER))
    status = bed.wait("stuck", "Failed")["status"]
    assert "compensation of step reserve failed" in status["message"]
    assert status["steps"][0]["phase"] == "CompensationFailed"
    assert ("Warning", "Failed") in bed.events("stuck")
    bed.services["inventory"].behave()  # a human fixed the ledger
    bed.cluster.kubectl(
        "annotate", "saga", "stuck", "-n", bed.namespace, "accord.dev/redrive=ticket-42"
    )
    status = bed.wait("stuck", "Compensated")["status"]
    assert bed.calls("inventory")[-1] == "release" and status["lastRedrive"] == "ticket-42"


def test_job_step_result_comes_from_the_termination_message(bed: SagaBed) -> None:
    """No kubelet runs here: the test plays it, moving the pod to Succeeded with a message."""
    steps = [
        ORDER[0],
        {
            "name": "render",
            "action": {"job": {"image": "registry.local/render:1", "command": ["render"]}},
        },
    ]
    bed.apply(bed.saga("with-job", steps, input={"doc": 7}))
    pod = _wait_pod(bed, "accord.dev/saga=with-job")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert json.loads(env["ACCORD_SAGA_INPUT"]) == {"doc": 7}
    assert "reserve" in json.loads(env["ACCORD_SAGA_OUTPUTS"])
    assert pod["metadata"]["annotations"]["accord.dev/inject"] == "true"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "SagaWorkflow"
    _finish_pod(bed, pod["metadata"]["name"], "Succeeded", '{"pages": 3}')
    status = bed.wait("with-job", "Succeeded")["status"]
    assert status["steps"][1]["output"] == {"pages": 3}


def test_failed_job_step_is_retried_then_compensates(bed: SagaBed) -> None:
    steps = [
        ORDER[0],
        {
            "name": "render",
            "retry": {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1}},
            "action": {"job": {"image": "registry.local/render:1"}},
        },
    ]
    bed.apply(bed.saga("job-fails", steps))
    first = _wait_pod(bed, "accord.dev/saga=job-fails")
    _finish_pod(bed, first["metadata"]["name"], "Failed", "out of paper", exit_code=3)
    second = _wait_pod(bed, "accord.dev/saga=job-fails", exclude={first["metadata"]["name"]})
    _finish_pod(bed, second["metadata"]["name"], "Failed", "still no paper", exit_code=3)
    status = bed.wait("job-fails", "Compensated")["status"]
    assert "still no paper" in status["steps"][1]["lastError"]
    assert bed.calls("inventory") == ["reserve", "release"]


def _wait_pod(
    bed: SagaBed, selector: str, exclude: set[str] | None = None, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(
            bed.cluster.kubectl("get", "pods", "-n", bed.namespace, "-l", selector, "-o", "json")
        )["items"]
        items = [p for p in items if p["metadata"]["name"] not in (exclude or set())]
        if items:
            return items[0]  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"no pod {selector}")


def _finish_pod(bed: SagaBed, name: str, phase: str, message: str, exit_code: int = 0) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "step",
                    "ready": False,
                    "restartCount": 0,
                    "image": "registry.local/render:1",
                    "imageID": "",
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if exit_code == 0 else "Error",
                            "message": message,
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
    }
    bed.cluster.kubectl(
        "patch",
        "pod",
        name,
        "-n",
        bed.namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def test_saga_metrics(bed: SagaBed) -> None:
    bed.services["payment"].behave({"path": "/charge", "fail": 1, "status": 503})
    bed.apply(bed.saga("counted", ORDER))
    bed.wait("counted", "Succeeded")
    assert bed.operator is not None
    op = bed.operator
    op.wait_metric("accord_sagas_total", 1, outcome="Succeeded")
    op.wait_metric("accord_saga_step_retries_total", 1, kind="action")
    op.wait_metric("accord_saga_step_duration_seconds_count", 3, kind="action")
    op.wait_metric("accord_sagas", 0, phase="Running")  # nothing driven now
    op.wait_metric("accord_phase_transitions_total", 1, kind="SagaWorkflow", phase="Succeeded")


def test_a_redriven_saga_is_counted_once_and_compensated_shows_nothing_done(bed: SagaBed) -> None:
    bed.services["inventory"].behave({"path": "/release", "status": 422})
    bed.services["payment"].behave({"path": "/charge", "status": 402})
    bed.apply(bed.saga("once", ORDER))
    bed.wait("once", "Failed")
    assert bed.operator is not None
    deadline = time.monotonic() + 30
    while bed.operator.metric("accord_sagas", phase="Failed") != 1:  # the gauge: driven now
        assert time.monotonic() < deadline
        time.sleep(0.3)
    bed.services["inventory"].behave()
    bed.cluster.kubectl("annotate", "saga", "once", "-n", bed.namespace, "accord.dev/redrive=1")
    status = bed.wait("once", "Compensated")["status"]
    assert status["progress"] == "0/3"
    assert status["cause"] == 'step charge failed: HTTP 402: {"error": "told to fail"}'
    assert bed.operator is not None
    bed.operator.wait_metric("accord_sagas_total", 1, outcome="Failed")
    bed.operator.wait_metric("accord_sagas", 0, phase="Failed")  # finished: not driven
    assert bed.operator.metric("accord_sagas_total", outcome="Compensated") == 0
    log = bed.operator.log.read_text()
    assert "saga " + bed.namespace + "/once: Failed: compensation of step reserve failed" in log


async def test_a_status_write_from_a_stale_view_is_refused_not_applied(
    cluster: Cluster, namespace: str
) -> None:
    """Two writers (two controllers, or one that slept through a change): the one that
    decided from an older version loses, instead of overwriting a newer decision."""
    import copy

    from accord_operator.kubeapi import KubeApi
    from accord_operator.store import KubeStore

    saga = cluster.apply(example("saga-order.yaml"), namespace)  # no controller runs here
    stale = copy.deepcopy(saga)
    api = KubeApi(str(cluster.kubeconfig))
    meta = saga["metadata"]
    store = KubeStore(api, f"/apis/accord.dev/v1alpha1/namespaces/{namespace}/"
                      f"sagaworkflows/{meta['name']}", None)  # fmt: skip
    first = {"phase": "Running", "message": "first writer"}
    try:
        assert await store.write(saga, first, {}) is None
        # The stale writer is handed the saga as it is now, to decide again from.
        now = await store.write(stale, {"phase": "Failed", "message": "stale writer"}, {})
        assert now is not None and now["status"]["message"] == "first writer"
        # The first writer goes on from the version it wrote.
        assert (
            await store.write(saga, {"phase": "Running", "message": "first, again"}, first) is None
        )
    finally:
        await api.close()
    assert cluster.get("saga", "order-1001", namespace)["status"]["message"] == "first, again"
