"""A CQRSProjection's planned objects and status, as pure functions."""

from __future__ import annotations

from typing import Any

import accord_wire as wire
from accord_operator.projection import plan
from accord_operator.projection.plan import Progress

NOW = "2026-11-26T10:00:00.000000Z"


def proj(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "orders", "uid": "u-1", "generation": 3},
        "spec": {
            "source": {"topic": "orders.events", "startFrom": "Beginning", "maxDeliveries": 4},
            "projector": {"image": "samples:1", "args": ["projector.py"], "port": 8081,
                          "env": [{"name": "READ_MODEL", "value": "x"}]},
            "replicas": 1,
            **spec,
        },
        "status": {"phase": "Pending"},
    }  # fmt: skip


def test_a_generation_runs_as_one_deployment_whose_pods_subscribe_through_the_sidecar() -> None:
    d = plan.deployment(proj(rebuildGeneration=2), 2)
    assert d["metadata"]["name"] == "orders-g2"
    owner = d["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("CQRSProjection", "u-1", True)
    spec = d["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    template = spec["template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "orders-g2"
    assert template["metadata"]["annotations"] == {
        "accord.dev/inject": "true",
        "accord.dev/app-port": "8081",
        "accord.dev/subscribe": "orders.events",
        "accord.dev/subscribe-concurrency": "1",
        "accord.dev/max-deliveries": "4",
        "accord.dev/subscribe-start": "all",
        "accord.dev/subscribe-poison": "park",
    }
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"ACCORD_PROJECTION_GENERATION": "2", "ACCORD_PROJECTION_NAME": "orders",
                   "ACCORD_PROJECTION_TOPIC": "orders.events", "ACCORD_PROJECTION_DATA": "/data",
                   "READ_MODEL": "x"}  # fmt: skip
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert template["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert container["args"] == ["projector.py"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The selector names the generation: two generations never share pods.
    assert spec["selector"]["matchLabels"] == {
        "accord.dev/projection": "orders",
        "accord.dev/projection-generation": "2",
    }


def test_the_consumer_is_named_after_the_projection_and_its_generation() -> None:
    app = plan.app_id("orders", 2)
    assert wire.durable_name(app, "orders.events").startswith("orders-g2-orders_events-")
    assert wire.durable_name(plan.app_id("orders", 3), "orders.events") != wire.durable_name(
        app, "orders.events"
    )


def test_paused_or_zero_replicas_run_no_projector() -> None:
    assert plan.deployment(proj(paused=True), 0)["spec"]["replicas"] == 0
    assert plan.deployment(proj(replicas=0), 0)["spec"]["replicas"] == 0
    assert plan.deployment(proj(replicas=4), 0)["spec"]["replicas"] == 1  # one consumer, one reader


def test_the_query_service_points_at_the_serving_generation() -> None:
    s = plan.query_service(proj(), 1)
    assert s["metadata"]["name"] == "orders"
    assert s["spec"]["selector"]["accord.dev/projection-generation"] == "1"
    assert s["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 8081}]


def test_a_made_object_is_replaced_only_when_the_wanted_one_changed() -> None:
    wanted = plan.deployment(proj(), 0)
    assert not plan.stale(wanted, plan.deployment(proj(), 0))
    assert plan.stale(wanted, plan.deployment(proj(paused=True), 0))
    assert plan.stale(None, wanted)


def status(progress: Progress | None, ready: int = 1, problem: str | None = None,
           **spec: Any) -> dict[str, Any]:  # fmt: skip
    return plan.next_status(proj(**spec), 0, progress, ready, NOW, problem)


def cond(st: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in st["conditions"]}


def test_lag_and_position_come_from_the_consumers_pending_counts() -> None:
    st = status(Progress(True, 100, True, pending=30, ack_pending=1, position=69))
    assert (st["phase"], st["lag"], st["position"], st["eventsProcessed"]) == (
        "CatchingUp",
        31,
        69,
        69,
    )
    assert cond(st) == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    live = status(Progress(True, 100, True, position=100, last_event_time="2026-11-26T09:59:59Z"))
    assert (live["phase"], live["lag"], live["eventsProcessed"]) == ("Live", 0, 100)
    assert live["lastEventTime"] == "2026-11-26T09:59:59Z"
    assert cond(live) == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}


def test_a_topic_with_no_events_is_live_once_a_projector_runs() -> None:
    assert status(Progress(True, 0))["phase"] == "Live"  # the filter matches nothing
    assert status(Progress(True, 0), ready=0)["phase"] == "Pending"
    # No consumer yet: everything on the topic is still to be projected (or nothing, when
    # it starts with what comes next).
    assert status(Progress(True, 7))["lag"] == 7
    new_only = plan.next_status(
        proj(source={"topic": "orders.events", "startFrom": "New"}), 0, Progress(True, 7), 1, NOW
    )
    assert (new_only["lag"], new_only["phase"]) == (0, "Live")


def test_deliveries_that_keep_failing_degrade_it_and_a_broker_away_stalls_it() -> None:
    failing = status(Progress(True, 10, True, pending=5, ack_pending=1, position=4, redelivered=1))
    assert failing["phase"] == "Degraded" and cond(failing)["Stalled"] == "True"
    away = status(None, problem="broker nats://x unreachable")
    assert away["phase"] == "Pending" and "unreachable" in away["message"]
    assert cond(away)["Stalled"] == "True"
    paused = status(Progress(True, 10, True, pending=10), paused=True)
    assert paused["phase"] == "Pending" and paused["message"].startswith("paused")


def test_a_status_is_written_only_when_it_says_something_new() -> None:
    first = status(Progress(True, 10, True, position=10))
    again = plan.next_status({**proj(), "status": first}, 0, Progress(True, 10, True, position=10),
                             1, "2026-11-26T10:00:05.000000Z")  # fmt: skip
    assert not plan.changed(first, again)
    moved = plan.next_status({**proj(), "status": first}, 0, Progress(True, 11, True, pending=1,
                             position=10), 1, NOW)  # fmt: skip
    assert plan.changed(first, moved)


def test_partitions_are_shared_out_among_the_replicas() -> None:
    d = plan.deployment(proj(partitions=4, replicas=3), 0)
    assert d["spec"]["replicas"] == 3
    assert (
        d["spec"]["template"]["metadata"]["annotations"]["accord.dev/subscribe-partitions"] == "4"
    )
    batched = plan.deployment(proj(projector={"image": "p", "batchSize": 100}), 0)
    assert (
        batched["spec"]["template"]["metadata"]["annotations"]["accord.dev/subscribe-bulk"] == "100"
    )
    one = plan.deployment(proj(), 0)
    assert (
        "accord.dev/subscribe-partitions" not in one["spec"]["template"]["metadata"]["annotations"]
    )
    # Never more replicas than partitions (admission refuses it too), none while paused.
    assert plan.replicas({"partitions": 2, "replicas": 5}) == 2
    assert plan.replicas({"partitions": 4, "replicas": 3, "paused": True}) == 0
    # Each partition has its own consumer, none shared with the unpartitioned one.
    names = {wire.consumer_name("orders-g0", "orders.events", (i, 4)) for i in range(4)}
    assert len(names) == 4 and wire.consumer_name("orders-g0", "orders.events") not in names
    assert wire.partition_of("customer-7", 4) == wire.partition_of("customer-7", 4)


def test_a_failure_its_sidecar_reports_degrades_it_with_the_reason() -> None:
    failing = plan.next_status(
        proj(),
        0,
        Progress(True, 10, True, pending=5, ack_pending=1, position=4,
                 failing="event 5 failed 3 time(s): app answered HTTP 500: boom"),
        1,
        NOW,
    )  # fmt: skip
    assert failing["phase"] == "Degraded"
    assert "app answered HTTP 500: boom" in failing["message"] and "6 behind" in failing["message"]


def test_an_in_place_projection_asks_its_sidecar_to_reset_the_model_before_a_replay() -> None:
    annotations = plan.deployment(proj(rebuild="InPlace"), 1)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["accord.dev/subscribe-reset"] == "/projection/reset"
    blue_green = plan.deployment(proj(), 1)["spec"]["template"]["metadata"]["annotations"]
    assert "accord.dev/subscribe-reset" not in blue_green


def test_nats_subject_matching_for_the_streams_check() -> None:
    assert wire.subject_matches("accord.>", "accord.orders.events")
    assert not wire.subject_matches("accord.>", "accord")
    assert wire.subject_matches("accord.*", "accord.orders")
    assert not wire.subject_matches("accord.*", "accord.orders.events")
    assert wire.subject_matches("accord.orders.events", "accord.orders.events")
    assert not wire.subject_matches("other.>", "accord.orders")
    config = wire.stream_config(604800, -1, 1, "file")
    assert config["subjects"] == ["accord.>"] and config["max_age"] == 604800.0
