"""Read your writes: /v1/publish answers with the event's stream sequence, and a
subscriber's sidecar answers "processed up to S" once every event of the topic up to S is
settled. The sample projector (examples/services/projector.py) uses it for
GET /orders?minSequence=S: a query that waits for the caller's own write."""

from __future__ import annotations

from typing import Any

from accord_operator.envtest.controlplane import free_port
from tests.support.dataplane import NatsServer, ProjectorProcess, Sidecar, request

TOPIC = "orders.events"


def projector_with_sidecar(spawn: Any, nats: NatsServer, tmp: Any) -> tuple[str, Sidecar]:
    """The projector and its sidecar, as its pod runs them (the sidecar first: deliveries
    wait for the app)."""
    port = free_port()
    sidecar = spawn(
        Sidecar, "orders-g0", ACCORD_NATS_URL=nats.url, ACCORD_SUBSCRIBE=TOPIC,
        ACCORD_APP_PORT=str(port), ACCORD_CONCURRENCY="1",
    )  # fmt: skip
    app: ProjectorProcess = spawn(ProjectorProcess, port, sidecar.http_port, TOPIC)
    return app.url, sidecar


def test_a_query_waits_for_the_callers_own_write(
    spawn: Any, nats: NatsServer, tmp_path: Any
) -> None:
    publisher = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    projector, _ = projector_with_sidecar(spawn, nats, tmp_path)
    request("POST", f"{projector}/_behave", {"delayMs": 300})  # each event takes 0.3 s
    sequences = []
    for i in range(5):
        event = {"id": f"o-{i}", "customer": "ann", "amountCents": 1}
        status, body, _ = request("POST", f"{publisher.api}/v1/publish/{TOPIC}", event)
        assert status == 200, body
        sequences.append(body["sequence"])
    # Without waiting, the read model is behind (5 events take 1.5 s to project).
    _, now, _ = request("GET", f"{projector}/orders")
    assert now["events"] < 5
    status, model, _ = request("GET", f"{projector}/orders?minSequence={sequences[-1]}")
    assert status == 200 and model["events"] == 5, model
    assert model["customers"]["ann"]["orders"] == 5


def test_the_wait_says_how_far_it_got_and_refuses_what_it_cannot_answer(
    spawn: Any, nats: NatsServer, tmp_path: Any
) -> None:
    publisher = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    _, sidecar = projector_with_sidecar(spawn, nats, tmp_path)
    _, body, _ = request("POST", f"{publisher.api}/v1/publish/{TOPIC}", {"id": "o-1"})
    seq = body["sequence"]
    base = f"{sidecar.api}/v1/subscriptions/{TOPIC}/processed"
    status, done, _ = request("GET", f"{base}?atLeast={seq}&timeoutMs=10000")
    assert status == 200 and done["processed"] >= seq
    status, late, _ = request("GET", f"{base}?atLeast={seq + 100}&timeoutMs=300")
    assert status == 504 and late["processed"] == done["processed"]
    assert request("GET", f"{sidecar.api}/v1/subscriptions/other/processed")[0] == 404
    assert request("GET", f"{base}?atLeast=x")[0] == 400
    assert request("GET", f"{base}?atLeast=1&timeoutMs=600001")[0] == 400


def test_after_a_restart_the_position_comes_from_the_broker(
    spawn: Any, nats: NatsServer, tmp_path: Any
) -> None:
    publisher = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    projector, sidecar = projector_with_sidecar(spawn, nats, tmp_path)
    _, body, _ = request("POST", f"{publisher.api}/v1/publish/{TOPIC}", {"id": "o-1"})
    seq = body["sequence"]
    assert request("GET", f"{projector}/orders?minSequence={seq}")[1]["events"] == 1
    sidecar.terminate()
    sidecar.start()  # nothing new to deliver: only the broker knows how far it got
    status, done, _ = request(
        "GET", f"{sidecar.api}/v1/subscriptions/{TOPIC}/processed?atLeast={seq}&timeoutMs=5000"
    )
    assert status == 200 and done["processed"] >= seq
