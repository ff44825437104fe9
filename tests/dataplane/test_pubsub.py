"""Publish -> JetStream -> subscribe -> app, through real sidecars and a real nats-server."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from tests.support.dataplane import (
    NatsServer,
    Recorder,
    Sidecar,
    request,
    subscriber,
    wait_until,
)


def _publisher(spawn: Callable[..., Any], nats: NatsServer) -> Sidecar:
    sidecar: Sidecar = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    return sidecar


def _subscriber(
    spawn: Callable[..., Any], nats: NatsServer, app: Recorder, topic: str = "orders", **env: str
) -> Sidecar:
    return subscriber(spawn, nats.url, f"projector-{topic.replace('.', '-')}", topic, app, **env)


def _publish(sidecar: Sidecar, topic: str, data: Any, **headers: str) -> tuple[int, Any]:
    status, body, _ = request("POST", f"{sidecar.api}/v1/publish/{topic}", data, headers=headers)
    return status, body


def _delivered_ids(app: Recorder, topic: str = "orders") -> list[str]:
    return [c["body"]["id"] for c in app.calls(f"/events/{topic}")]


def test_publish_reaches_the_subscribed_app_in_order(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    publisher = _publisher(spawn, nats)
    _subscriber(spawn, nats, app)
    ids = []
    for i in range(20):
        status, body = _publish(publisher, "orders", {"order": i})
        assert status == 200 and body["duplicate"] is False
        ids.append(body["id"])
    wait_until(lambda: len(_delivered_ids(app)) >= 20)
    assert _delivered_ids(app) == ids  # ordered, exactly these
    event = app.calls("/events/orders")[0]
    assert event["headers"]["Content-Type"] == "application/cloudevents+json"
    assert event["body"]["specversion"] == "1.0" and event["body"]["data"] == {"order": 0}
    assert event["body"]["source"] == "accord://default/orders-api"
    assert event["body"]["datacontenttype"] == "application/json"


def test_structured_and_binary_cloudevents(spawn: Callable[..., Any], nats: NatsServer) -> None:
    app: Recorder = spawn(Recorder, "projector")
    publisher = _publisher(spawn, nats)
    _subscriber(spawn, nats, app)
    structured = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/shop",
        "type": "order.placed",
        "data": {"order": 1},
    }
    status, _, _ = request(
        "POST",
        f"{publisher.api}/v1/publish/orders",
        data=json.dumps(structured).encode(),
        headers={"Content-Type": "application/cloudevents+json"},
    )
    assert status == 200
    status, _, _ = request(
        "POST",
        f"{publisher.api}/v1/publish/orders",
        data=b"plain text",
        headers={
            "Content-Type": "text/plain",
            "ce-specversion": "1.0",
            "ce-id": "evt-2",
            "ce-source": "/shop",
            "ce-type": "order.noted",
        },
    )
    assert status == 200
    wait_until(lambda: len(_delivered_ids(app)) >= 2)
    first, second = (c["body"] for c in app.calls("/events/orders"))
    assert (
        first["id"] == "evt-1" and first["type"] == "order.placed" and first["data"] == {"order": 1}
    )
    assert (
        second["id"] == "evt-2"
        and second["type"] == "order.noted"
        and second["data"] == "plain text"
    )


def test_duplicate_event_ids_are_dropped_by_the_broker(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    publisher = _publisher(spawn, nats)
    _subscriber(spawn, nats, app)
    headers = {
        "Content-Type": "text/plain",
        "ce-specversion": "1.0",
        "ce-id": "same-id",
        "ce-source": "/shop",
        "ce-type": "t",
    }
    results = [
        request("POST", f"{publisher.api}/v1/publish/orders", data=b"x", headers=headers)[1]
        for _ in range(3)
    ]
    assert [r["duplicate"] for r in results] == [False, True, True]
    _publish(publisher, "orders", {"marker": True})
    wait_until(lambda: len(_delivered_ids(app)) >= 2)
    time.sleep(0.3)
    assert _delivered_ids(app)[0] == "same-id" and len(_delivered_ids(app)) == 2


def test_failures_are_redelivered_then_dead_lettered(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    dlq_app: Recorder = spawn(Recorder, "dlq-reader")
    app.behave({"path": "/events/orders", "status": 500, "body": {"error": "projection broken"}})
    publisher = _publisher(spawn, nats)
    subscriber = _subscriber(spawn, nats, app, ACCORD_MAX_DELIVERIES="3")
    _subscriber(spawn, nats, dlq_app, topic="orders.dlq")
    _, body = _publish(publisher, "orders", {"order": 7})
    dead = wait_until(lambda: dlq_app.calls("/events/orders.dlq"), message="nothing dead-lettered")
    assert len(app.calls("/events/orders")) == 3
    letter = dead[0]["body"]
    assert letter["id"] == body["id"] and letter["data"] == {"order": 7}
    assert letter["deadlettertopic"] == "orders" and letter["deadletterdeliveries"] == 3
    assert (
        "HTTP 500" in letter["deadletterreason"]
        and "projection broken" in letter["deadletterreason"]
    )
    assert subscriber.metric("accord_sidecar_dead_lettered_total", topic="orders") == 1
    assert subscriber.metric("accord_sidecar_redeliveries_total", topic="orders") == 2
    time.sleep(0.5)
    assert len(app.calls("/events/orders")) == 3  # acked on the DLQ: not delivered again


def test_retry_and_drop_answers(spawn: Callable[..., Any], nats: NatsServer) -> None:
    app: Recorder = spawn(Recorder, "projector")
    app.behave({"path": "/events/orders", "fail": 2, "reply": {"status": "RETRY"}})
    publisher = _publisher(spawn, nats)
    subscriber = _subscriber(spawn, nats, app)
    _publish(publisher, "orders", {"n": 1})
    wait_until(lambda: len(app.calls("/events/orders")) >= 3)
    assert (
        subscriber.metric("accord_sidecar_deliveries_total", topic="orders", outcome="retry") == 2
    )
    app.behave({"path": "/events/orders", "reply": {"status": "DROP"}})
    _publish(publisher, "orders", {"n": 2})
    wait_until(
        lambda: (
            subscriber.metric("accord_sidecar_deliveries_total", topic="orders", outcome="drop")
            == 1
        )
    )
    time.sleep(0.3)
    assert len(app.calls("/events/orders")) == 4


def test_subscriber_sigkilled_mid_stream_loses_no_event(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    app.behave({"path": "/events/orders", "delayMs": 40})  # 300 events take >= 3 s
    publisher = _publisher(spawn, nats)
    subscriber = _subscriber(spawn, nats, app, ACCORD_CONCURRENCY="4", ACCORD_TIMEOUT_MS="1000")
    ids = [_publish(publisher, "orders", {"n": i})[1]["id"] for i in range(300)]
    wait_until(lambda: len(_delivered_ids(app)) >= 50)
    subscriber.kill()  # SIGKILL: no chance to ack what is in flight
    seen_at_kill = len(_delivered_ids(app))
    assert seen_at_kill < 300
    subscriber.start()
    wait_until(lambda: set(_delivered_ids(app)) >= set(ids), timeout=60, message="events lost")
    assert set(_delivered_ids(app)) == set(ids)  # at-least-once: duplicates allowed, no loss


def test_nats_restart_mid_stream_reconnects_and_loses_nothing(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    publisher = _publisher(spawn, nats)
    subscriber = _subscriber(spawn, nats, app)
    acked: list[str] = []
    done = threading.Event()

    def publish_all() -> None:
        for i in range(200):
            event_id = str(uuid.uuid4())
            headers = {
                "Content-Type": "application/json",
                "ce-specversion": "1.0",
                "ce-id": event_id,
                "ce-source": "/t",
                "ce-type": "t",
            }
            # What a well-behaved app does: retry a 503 with the same event id.
            for _ in range(100):
                status, _, _ = request(
                    "POST",
                    f"{publisher.api}/v1/publish/orders",
                    data=json.dumps({"n": i}).encode(),
                    headers=headers,
                )
                if status == 200:
                    acked.append(event_id)
                    break
                assert status == 503, status
                time.sleep(0.1)
        done.set()

    thread = threading.Thread(target=publish_all)
    thread.start()
    wait_until(lambda: len(acked) >= 50)
    nats.kill()
    time.sleep(1)
    nats.start()  # same port, same store
    thread.join(timeout=120)
    assert done.is_set() and len(acked) == 200
    wait_until(lambda: set(_delivered_ids(app)) >= set(acked), timeout=60, message="events lost")
    status, body, _ = request("GET", f"http://127.0.0.1:{subscriber.admin_port}/readyz")
    assert status == 200, body


def test_batch_publish_and_bulk_delivery_with_per_event_answers(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    # First delivery: e2 asks to be retried, e3 is dropped, e4 is not answered for.
    app.behave(
        {
            "path": "/events/orders",
            "fail": 1,
            "reply": {
                "statuses": [
                    {"id": "e1", "status": "SUCCESS"},
                    {"id": "e2", "status": "RETRY"},
                    {"id": "e3", "status": "DROP"},
                    {"id": "e5", "status": "SUCCESS"},
                ]
            },
        }
    )
    publisher = _publisher(spawn, nats)
    batch = [
        {
            "specversion": "1.0",
            "id": f"e{i}",
            "source": "/shop",
            "type": "order.placed",
            "data": {"n": i},
        }
        for i in range(1, 6)
    ]
    status, body, _ = request(
        "POST",
        f"{publisher.api}/v1/publish/orders",
        data=json.dumps(batch).encode(),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert status == 200 and [r["id"] for r in body["results"]] == ["e1", "e2", "e3", "e4", "e5"]
    # Subscribe only now, so that the first fetch finds all five on the stream.
    _subscriber(spawn, nats, app, ACCORD_BULK_MAX="10")

    def again() -> list[str]:
        return sorted(e["id"] for c in app.calls("/events/orders")[1:] for e in c["body"])

    wait_until(lambda: again() == ["e2", "e4"])
    first = app.calls("/events/orders")[0]
    assert first["headers"]["Content-Type"] == "application/cloudevents-batch+json"
    assert [e["id"] for e in first["body"]] == ["e1", "e2", "e3", "e4", "e5"]
    time.sleep(0.5)
    assert again() == ["e2", "e4"]  # only what was not done, once each

    bad = [
        {"specversion": "1.0", "id": "x", "source": "/s", "type": "t"},
        {"specversion": "1.0", "id": ""},
    ]
    status, body, _ = request(
        "POST",
        f"{publisher.api}/v1/publish/orders",
        data=json.dumps(bad).encode(),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert status == 400 and "[1].id" in body["error"]["message"]


def _in_order_with_replays(delivered: list[str], ids: list[str]) -> bool:
    """Ordered at-least-once: an event is first delivered only after every earlier one was
    (a replay after a failover may go back, never skip ahead)."""
    index = {event_id: n for n, event_id in enumerate(ids)}
    reached = 0  # how many of ids were delivered, in order, so far
    for event_id in delivered:
        n = index[event_id]
        if n > reached:
            return False
        reached = max(reached, n + 1)
    return True


def test_ordered_delivery_has_one_owner_among_replicas_and_fails_over_in_order(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """Two replicas of one app subscribe in order: one delivers, in batches, the other
    stands by. SIGKILL the one delivering: the other takes over from the first unacked
    event, so the app sees every event, in order, with only those in flight replayed."""
    first: Recorder = spawn(Recorder, "replica-a")
    second: Recorder = spawn(Recorder, "replica-b")
    for app in (first, second):
        app.behave({"path": "/events/orders", "delayMs": 10})  # 400 events take >= 4 s
    publisher = _publisher(spawn, nats)
    ids = [_publish(publisher, "orders", {"n": i})[1]["id"] for i in range(400)]
    a = subscriber(spawn, nats.url, "projector", "orders", first)
    wait_until(lambda: len(_delivered_ids(first)) >= 20)
    subscriber(spawn, nats.url, "projector", "orders", second)
    time.sleep(1.0)
    assert _delivered_ids(second) == []  # a standby
    a.kill()
    wait_until(
        lambda: set(_delivered_ids(first)) | set(_delivered_ids(second)) >= set(ids),
        timeout=60,
        message="events lost",
    )
    delivered = _delivered_ids(first) + _delivered_ids(second)
    assert _delivered_ids(second), "the standby never took over"
    assert _in_order_with_replays(delivered, ids), delivered
    # Replayed: at most what the killed owner had fetched and not acked.
    assert len(delivered) - len(ids) <= 256


def test_a_failing_event_holds_back_the_ones_after_it_then_is_dead_lettered(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    publisher = _publisher(spawn, nats)
    ids = [_publish(publisher, "orders", {"n": i})[1]["id"] for i in range(30)]
    app.behave({"path": "/events/orders", "id": ids[0], "status": 500})  # always fails
    _subscriber(spawn, nats, app, ACCORD_MAX_DELIVERIES="3")
    wait_until(lambda: len(_delivered_ids(app)) >= 32)
    time.sleep(0.3)
    assert _delivered_ids(app) == [ids[0]] * 3 + ids[1:]


def test_partitions_keep_order_per_key_and_change_hands_as_replicas_come_and_go(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """4 partitions, replicas scaled 1 -> 4 -> 2 while events flow (one stopped, one
    killed), all delivering to one shared read model: every event arrives, the events of
    each key in order (a replay after a handover may go back, never skip ahead), and each
    replica takes its share of the partitions."""
    app: Recorder = spawn(Recorder, "projector")
    publisher = _publisher(spawn, nats)
    keys = [f"customer-{k}" for k in range(12)]
    ids: dict[str, list[str]] = {k: [] for k in keys}
    stop = threading.Event()

    def publish() -> None:
        n = 0
        while not stop.is_set():
            key = keys[n % len(keys)]
            status, body = _publish(publisher, "orders", {"n": n}, **{"Accord-Partition-Key": key})
            assert status == 200, body
            ids[key].append(body["id"])
            n += 1
            time.sleep(0.01)

    def replica() -> Sidecar:
        name = f"projector-{len(replicas)}"  # its log; one app id for all
        return subscriber(spawn, nats.url, name, "orders", app, ACCORD_APP_ID="projector",
                          ACCORD_PARTITIONS="4", ACCORD_PREFETCH="16")  # fmt: skip

    def took(sidecar: Sidecar) -> bool:
        return "this one takes partitions" in sidecar.log.read_text()

    writer = threading.Thread(target=publish)
    writer.start()
    try:
        replicas: list[Sidecar] = []
        replicas.append(replica())
        wait_until(lambda: len(app.calls("/events/orders")) >= 50)
        for _ in range(3):  # scale to 4
            replicas.append(replica())

        def all_deliver() -> bool:
            logs = [r.log.read_text() for r in replicas]
            return all("4 replica(s)" in t and "this sidecar delivers" in t for t in logs)

        wait_until(all_deliver, timeout=45, message="a replica never took its partition")
        time.sleep(1)
        replicas[3].close()  # scale to 2: one stops (gives its partition up), one is killed
        replicas[2].kill()
        wait_until(lambda: all("2 replica(s)" in r.log.read_text() for r in replicas[:2]),
                   timeout=45)  # fmt: skip
        time.sleep(2)
    finally:
        stop.set()
        writer.join()
    every = {i for k in keys for i in ids[k]}
    wait_until(
        lambda: {c["body"]["id"] for c in app.calls("/events/orders")} >= every,
        timeout=60,
        message="events lost",
    )
    calls = app.calls("/events/orders")
    for key in keys:
        mine = [c["body"]["id"] for c in calls if c["body"].get("partitionkey") == key]
        assert _in_order_with_replays(mine, ids[key]), (key, mine, ids[key])
    assert all(took(r) for r in replicas)


def test_one_event_id_on_two_topics_or_from_two_sources_is_two_events(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """The broker drops a re-published event (same source, id and topic) within its
    duplicate window; the same id on another topic, or from another source, is kept."""
    publisher = _publisher(spawn, nats)

    def publish(topic: str, source: str) -> dict[str, Any]:
        event = {"specversion": "1.0", "id": "o-1", "source": source, "type": "t"}
        status, body = _publish(publisher, topic, event,
                                **{"Content-Type": "application/cloudevents+json"})  # fmt: skip
        assert status == 200, body
        return dict(body)

    assert publish("orders", "/shop")["duplicate"] is False
    assert publish("orders", "/shop")["duplicate"] is True  # a retry: dropped
    assert publish("payments", "/shop")["duplicate"] is False  # another topic
    assert publish("orders", "/billing")["duplicate"] is False  # another source
