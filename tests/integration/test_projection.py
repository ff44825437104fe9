"""CQRSProjection on real parts: the API server, a real `nats-server -js`, the operator
process, and the projector (examples/services/projector.py) behind a real sidecar, as the
operator's Deployment would run them. No kubelet runs here, so the test stands in for one:
it marks the projector's pod ready once the real processes are up (the in-cluster suite
runs them as real pods). Everything the status says comes from the broker."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from accord_operator.envtest.controlplane import free_port
from tests.support.cluster import REPO, Cluster
from tests.support.dataplane import NatsServer, Process, Sidecar, _wait_port, request, wait_until
from tests.support.operator import OperatorProcess, run_operator

PROJECTOR = REPO / "examples" / "services" / "projector.py"
TOPIC = "orders.events"


@dataclass
class Bed:
    cluster: Cluster
    namespace: str
    tmp: Path
    nats: NatsServer
    publisher: Sidecar
    operator: OperatorProcess
    stack: ExitStack

    def publish(self, n: int, start: int = 0, keyed: bool = False) -> int:
        """n order events through the publisher's sidecar (keyed: by customer); the last
        stream sequence."""
        seq = 0
        for i in range(start, start + n):
            event = {"id": f"o-{i}", "customer": f"c{i % 5}", "amountCents": 100 + i}
            headers = {"Accord-Idempotency-Key": f"o-{i}"}
            if keyed:
                headers["Accord-Partition-Key"] = event["customer"]
            status, body, _ = request(
                "POST", f"{self.publisher.api}/v1/publish/{TOPIC}", event, headers=headers
            )
            assert status == 200, body
            seq = int(body["sequence"])
        return seq

    def projection(self, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "accord.dev/v1alpha1",
            "kind": "CQRSProjection",
            "metadata": {"name": "orders"},
            "spec": {
                "source": {"topic": TOPIC},
                "projector": {"image": "samples", "args": ["projector.py"], "port": 8080},
                **spec,
            },
        }

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = (
            self.cluster.get("proj", "orders", self.namespace).get("status") or {}
        )
        return status

    def projector(
        self,
        generation: int,
        delay_ms: int = 0,
        replica: int = 0,
        in_place: bool = False,
        **env: str,
    ) -> tuple[Process, Sidecar]:
        """The projector of one generation and its sidecar, as its pod would run them
        (in_place: one read model for all generations, reset by its sidecar)."""
        port = free_port()
        data = self.tmp / ("model" if in_place else f"g{generation}-{replica}")
        data.mkdir(exist_ok=True)
        if in_place:
            env["ACCORD_RESET_PATH"] = "/projection/reset"
        app = Process(
            [sys.executable, str(PROJECTOR), "--port", str(port), "--host", "127.0.0.1",
             "--data", str(data), *(["--in-place"] if in_place else [])],
            self.tmp / f"projector-g{generation}-{replica}.log",
            env={"ACCORD_PROJECTION_GENERATION": str(generation)},
        ).start()  # fmt: skip
        self.stack.callback(app.close)
        assert app.proc is not None
        _wait_port(port, app.proc, app.log)
        if delay_ms:
            request("POST", f"http://127.0.0.1:{port}/_behave", {"delayMs": delay_ms})
        sidecar = Sidecar(
            self.tmp, f"orders-g{generation}-{replica}",
            ACCORD_APP_ID=f"orders-g{generation}",  # the app id the injector gives its pods
            ACCORD_NATS_URL=self.nats.url, ACCORD_SUBSCRIBE=TOPIC, ACCORD_APP_PORT=str(port),
            ACCORD_CONCURRENCY="1", ACCORD_NEW_SUBSCRIPTIONS_START="all", **env,
        ).start()  # fmt: skip
        self.stack.callback(sidecar.close)
        app.port = port  # type: ignore[attr-defined]
        return app, sidecar

    def read_model(self, app: Process) -> dict[str, Any]:
        _, body, _ = request("GET", f"http://127.0.0.1:{app.port}/orders")  # type: ignore[attr-defined]
        model: dict[str, Any] = body
        return model

    def mark_ready(self, generation: int) -> None:
        """Stand in for the kubelet: the generation's pod runs (as processes) and is ready."""

        def pods() -> list[dict[str, Any]]:
            out = self.cluster.kubectl(
                "get", "pods", "-n", self.namespace, "-o", "json",
                "-l", f"accord.dev/projection-generation={generation}",
            )  # fmt: skip
            items: list[dict[str, Any]] = json.loads(out)["items"]
            return items

        for pod in wait_until(pods, timeout=30, message="the Deployment made no pod"):
            status = {
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": t, "status": "True"} for t in ("PodScheduled", "Initialized",
                                                                 "ContainersReady", "Ready")
                    ],
                }
            }  # fmt: skip
            self.cluster.kubectl(
                "patch", "pod", pod["metadata"]["name"], "-n", self.namespace,
                "--subresource=status", "--type=merge", "-p", json.dumps(status),
            )  # fmt: skip


def expected_model(n: int) -> dict[str, Any]:
    customers: dict[str, Any] = {}
    for i in range(n):
        c = customers.setdefault(f"c{i % 5}", {"orders": 0, "amountCents": 0})
        c["orders"] += 1
        c["amountCents"] += 100 + i
    return customers


@pytest.fixture
def bed(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Bed]:
    with ExitStack() as stack:
        nats = NatsServer(tmp_path).start()
        stack.callback(nats.close)
        publisher = Sidecar(tmp_path, "orders-api", ACCORD_NATS_URL=nats.url).start()
        stack.callback(publisher.close)
        operator = stack.enter_context(
            run_operator(cluster, tmp_path, env={"ACCORD_NATS_URL": nats.url})
        )
        yield Bed(cluster, namespace, tmp_path, nats, publisher, operator, stack)


def test_status_tells_the_brokers_truth_while_the_projector_catches_up(bed: Bed) -> None:
    last = bed.publish(120)  # a backlog before the projection exists
    bed.cluster.apply(bed.projection(), bed.namespace)
    deployment = bed.cluster.wait_for("deployment", "orders-g0", bed.namespace, lambda d: d)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["accord.dev/subscribe"] == TOPIC
    service = bed.cluster.get("service", "orders", bed.namespace)
    assert service["spec"]["selector"]["accord.dev/projection-generation"] == "0"
    # No projector runs yet: every event is still to be projected.
    wait_until(lambda: bed.status().get("lag") == 120, timeout=30)
    assert bed.status()["phase"] == "Pending"

    app, _ = bed.projector(0, delay_ms=40)  # slow enough to be seen catching up
    bed.mark_ready(0)
    seen = wait_until(
        lambda: (s := bed.status()).get("phase") == "CatchingUp" and 0 < s["lag"] < 120 and s,
        timeout=60,
    )
    assert seen["position"] < last
    live = wait_until(lambda: (s := bed.status()).get("phase") == "Live" and s, timeout=90)
    assert (live["lag"], live["position"], live["eventsProcessed"]) == (0, last, 120)
    assert live["lastEventTime"] and live["servingGeneration"] == 0
    conditions = {c["type"]: c["status"] for c in live["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    model = bed.read_model(app)
    assert model["events"] == 120 and model["customers"] == expected_model(120)

    # A burst: lag shows in the status, then 0 again.
    last = bed.publish(60, start=120)
    wait_until(lambda: bed.status().get("lag", 0) > 0, timeout=30)
    live = wait_until(
        lambda: (s := bed.status()).get("phase") == "Live" and s["position"] == last and s,
        timeout=90,
    )
    assert live["eventsProcessed"] == 180
    assert bed.read_model(app)["customers"] == expected_model(180)
    assert bed.operator.metric("accord_projection_lag", namespace=bed.namespace,
                               projection="orders") == 0  # fmt: skip


def test_a_rebuild_runs_beside_the_serving_generation_and_takes_over_once_caught_up(
    bed: Bed,
) -> None:
    bed.publish(80)
    bed.cluster.apply(bed.projection(), bed.namespace)
    old, _ = bed.projector(0)
    bed.mark_ready(0)
    wait_until(lambda: bed.status().get("phase") == "Live", timeout=60)

    bed.cluster.kubectl("patch", "proj", "orders", "-n", bed.namespace, "--type=merge",
                        "-p", '{"spec": {"rebuildGeneration": 1}}')  # fmt: skip
    bed.cluster.wait_for("deployment", "orders-g1", bed.namespace, lambda d: d)
    rebuilding = wait_until(lambda: (s := bed.status()).get("phase") == "Rebuilding" and s)
    assert rebuilding["servingGeneration"] == 0
    # The query Service stays on the old read model while the new one fills.
    service = bed.cluster.get("service", "orders", bed.namespace)
    assert service["spec"]["selector"]["accord.dev/projection-generation"] == "0"
    assert bed.read_model(old)["events"] == 80

    new, _ = bed.projector(1, delay_ms=20)
    bed.mark_ready(1)
    live = wait_until(
        lambda: (s := bed.status()).get("phase") == "Live" and s.get("servingGeneration") == 1
        and s, timeout=90,
    )  # fmt: skip
    assert (live["observedRebuildGeneration"], live["eventsProcessed"]) == (1, 80)
    service = bed.cluster.get("service", "orders", bed.namespace)
    assert service["spec"]["selector"]["accord.dev/projection-generation"] == "1"
    wait_until(lambda: not bed.cluster.exists("deployment", "orders-g0", bed.namespace))
    # The rebuilt model is the old one, event for event.
    assert (
        bed.read_model(new)["customers"] == bed.read_model(old)["customers"] == expected_model(80)
    )
    assert bed.operator.metric("accord_projection_generation_switches_total") == 1


def test_a_failing_event_degrades_it_with_the_reason_until_it_is_dead_lettered(bed: Bed) -> None:
    """A poison event holds back the ones after it (order kept): the status says Degraded
    with the app's answer, from the sidecar's report; after max deliveries it goes to the
    dead-letter topic and the projection is Live again with everything else projected."""
    bed.cluster.apply(bed.projection(source={"topic": TOPIC, "maxDeliveries": 7}), bed.namespace)
    app, _ = bed.projector(0, ACCORD_MAX_DELIVERIES="7")
    request("POST", f"http://127.0.0.1:{app.port}/_behave", {"failIds": ["o-3"]})  # type: ignore[attr-defined]
    bed.mark_ready(0)
    last = bed.publish(10)
    degraded = wait_until(lambda: (s := bed.status()).get("phase") == "Degraded" and s, timeout=60)
    assert "cannot apply ['o-3']" in degraded["message"], degraded["message"]
    assert bed.read_model(app)["events"] == 3  # o-0..o-2; o-4.. wait behind o-3
    # (The position may pass `last`: the dead-lettered copy went onto the stream after it.)
    live = wait_until(
        lambda: (s := bed.status()).get("phase") == "Live" and s["position"] >= last and s,
        timeout=90,
    )
    assert live["eventsProcessed"] == 10
    assert bed.read_model(app)["events"] == 9  # all but the poison one
    assert wait_until(lambda: bed.status().get("deadLettered") == 1)


def test_partitions_are_shared_by_the_replicas_and_the_status_covers_them_all(bed: Bed) -> None:
    bed.cluster.apply(bed.projection(partitions=2, replicas=2), bed.namespace)
    deployment = bed.cluster.wait_for("deployment", "orders-g0", bed.namespace, lambda d: d)
    assert deployment["spec"]["replicas"] == 2
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["accord.dev/subscribe-partitions"] == "2"
    pods = [bed.projector(0, replica=r, ACCORD_PARTITIONS="2") for r in range(2)]
    apps = [app for app, _ in pods]
    bed.mark_ready(0)
    wait_until(  # each sidecar has taken its share (one partition each)
        lambda: all(
            "2 replica(s)" in (log := sidecar.log.read_text()) and "this sidecar delivers" in log
            for _, sidecar in pods
        ),
        timeout=30,
    )
    last = bed.publish(100)
    live = wait_until(
        lambda: (s := bed.status()).get("phase") == "Live" and s["position"] == last and s,
        timeout=90,
    )
    assert (live["lag"], live["eventsProcessed"]) == (0, 100)
    models = [bed.read_model(a) for a in apps]
    assert all(m["events"] > 0 for m in models)  # each replica projects its partition
    assert sum(m["events"] for m in models) == 100  # together: each event once


def test_a_poison_event_parks_its_key_until_the_annotation_retries_it(bed: Bed) -> None:
    """As the injector sets it up for a projection (ACCORD_POISON=park): o-3 (customer c3)
    keeps failing; after maxDeliveries it is dead-lettered and parks c3, so o-8 (c3 too)
    waits while the other customers go on. The status counts what is parked; once the
    projector is fixed, accord.dev/parked=retry delivers both, in order, and is removed."""
    bed.cluster.apply(bed.projection(source={"topic": TOPIC, "maxDeliveries": 2}), bed.namespace)
    app, _ = bed.projector(0, ACCORD_MAX_DELIVERIES="2", ACCORD_POISON="park")
    request("POST", f"http://127.0.0.1:{app.port}/_behave", {"failIds": ["o-3"]})  # type: ignore[attr-defined]
    bed.mark_ready(0)
    bed.publish(10, keyed=True)
    parked = wait_until(
        lambda: (s := bed.status()).get("parkedKeys") == 1 and s.get("parkedEvents") == 2 and s,
        timeout=60,
    )
    assert parked["phase"] == "Live" and "1 key(s) parked" in parked["message"]
    assert parked["deadLettered"] == 1  # o-3, on <topic>.dlq with its reason
    model = bed.read_model(app)
    assert model["events"] == 8 and "c3" not in model["customers"]

    request("POST", f"http://127.0.0.1:{app.port}/_behave", {})  # type: ignore[attr-defined]
    bed.cluster.kubectl("annotate", "proj", "orders", "-n", bed.namespace,
                        "accord.dev/parked=retry")  # fmt: skip
    wait_until(
        lambda: (
            "accord.dev/parked"
            not in (
                bed.cluster.get("proj", "orders", bed.namespace)["metadata"].get("annotations")
                or {}
            )
        ),
        timeout=60,
    )
    done = wait_until(lambda: (s := bed.status()).get("parkedKeys") == 0 and s, timeout=30)
    assert "parkedCommand" not in done
    assert bed.read_model(app)["customers"] == expected_model(10)
    assert bed.operator.metric("accord_projection_parked_events", namespace=bed.namespace,
                               projection="orders") == 0  # fmt: skip


def test_an_in_place_rebuild_resets_the_one_read_model_then_replays_it(bed: Bed) -> None:
    """rebuild: InPlace, for a projector with one read model: the old generation stops at
    once, the new one's sidecar has the projector empty its model (POST /projection/reset)
    before replaying the stream into it; Rebuilding until caught up, then Live, exact."""
    bed.cluster.apply(bed.projection(rebuild="InPlace"), bed.namespace)
    deployment = bed.cluster.wait_for("deployment", "orders-g0", bed.namespace, lambda d: d)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["accord.dev/subscribe-reset"] == "/projection/reset"
    old_app, old_sidecar = bed.projector(0, in_place=True)
    bed.mark_ready(0)
    last = bed.publish(60)
    wait_until(lambda: (s := bed.status()).get("phase") == "Live" and s["position"] == last)
    assert bed.read_model(old_app)["events"] == 60

    bed.cluster.kubectl("patch", "proj", "orders", "-n", bed.namespace, "--type=merge",
                        "-p", '{"spec": {"rebuildGeneration": 1}}')  # fmt: skip
    wait_until(  # the old generation goes at once: no second read model is kept
        lambda: not bed.cluster.kubectl("get", "deployment", "orders-g0", "-n", bed.namespace,
                                        "--ignore-not-found").strip(),
        timeout=30,
    )  # fmt: skip
    old_sidecar.close()
    old_app.close()
    app, _ = bed.projector(1, delay_ms=60, in_place=True)
    bed.mark_ready(1)
    rebuilding = wait_until(lambda: (s := bed.status()).get("phase") == "Rebuilding" and s)
    assert rebuilding["servingGeneration"] == 1 and "in place" in rebuilding["message"]
    live = wait_until(lambda: (s := bed.status()).get("phase") == "Live" and s, timeout=60)
    assert (live["eventsProcessed"], live["servingGeneration"]) == (60, 1)
    model = bed.read_model(app)
    assert (model["generation"], model["events"]) == ("1", 60)
    assert model["customers"] == expected_model(60)
    assert "reset to generation 1: emptied" in app.log.read_text()


def test_ten_thousand_events_survive_the_projector_and_its_sidecar_killed_mid_stream(
    bed: Bed,
) -> None:
    """10,000 events, in batches of 100 per delivery; the projector and its sidecar are
    SIGKILLed half-way (nothing acked for what was in flight) and started again on the same
    read model: every event is in it exactly once (redelivered ones are recognised by id)."""
    bed.cluster.apply(bed.projection(projector={"image": "samples", "args": ["projector.py"],
                                                "port": 8080, "batchSize": 100}),
                      bed.namespace)  # fmt: skip
    app, sidecar = bed.projector(0, delay_ms=5, ACCORD_BULK_MAX="100")
    bed.mark_ready(0)
    total, batch = 10_000, 1_000
    for start in range(0, total, batch):
        events = [
            {"specversion": "1.0", "id": f"o-{i}", "source": "/orders", "type": "order.placed",
             "data": {"id": f"o-{i}", "customer": f"c{i % 5}", "amountCents": 100 + i}}
            for i in range(start, start + batch)
        ]  # fmt: skip
        status, body, _ = request(
            "POST", f"{bed.publisher.api}/v1/publish/{TOPIC}", data=json.dumps(events).encode(),
            headers={"Content-Type": "application/cloudevents-batch+json"},
        )  # fmt: skip
        assert status == 200, body
    wait_until(lambda: 2_000 < bed.read_model(app)["events"] < total, timeout=60, interval=0.05)
    sidecar.kill()
    app.kill()
    app.start()
    _wait_port(app.port, app.proc, app.log)  # type: ignore[attr-defined,arg-type]
    sidecar.start()
    live = wait_until(
        lambda: (
            (s := bed.status()).get("phase") == "Live" and s.get("eventsProcessed") == total and s
        ),
        timeout=120,
    )
    assert live["lag"] == 0
    model = bed.read_model(app)
    assert model["events"] == total and model["customers"] == expected_model(total)


def test_the_operator_makes_the_stream_and_says_when_it_cannot_be_a_source(bed: Bed) -> None:
    """No stream yet (no sidecar made it): the operator makes it, with the chart's settings.
    A stream that does not take the topic's subject is named in the status."""

    async def drop_and(js: Any, subjects: list[str] | None) -> None:
        await js.delete_stream("ACCORD")
        if subjects is not None:
            await js.add_stream(name="ACCORD", subjects=subjects)

    def on_broker(subjects: list[str] | None) -> None:
        async def run() -> None:
            nc = await nats.connect(bed.nats.url)
            try:
                await drop_and(nc.jetstream(), subjects)
            finally:
                await nc.close()

        asyncio.run(run())

    on_broker(None)
    bed.cluster.apply(bed.projection(), bed.namespace)
    pending = wait_until(lambda: (s := bed.status()).get("lag") == 0 and s, timeout=30)
    assert pending["lag"] == 0 and "projector" in pending["message"], pending

    async def subjects() -> list[str]:
        nc = await nats.connect(bed.nats.url)
        try:
            return list((await nc.jetstream().stream_info("ACCORD")).config.subjects or [])
        finally:
            await nc.close()

    assert asyncio.run(subjects()) == ["accord.>"]
    on_broker(["other.>"])
    wrong = wait_until(
        lambda: (
            "does not take subject accord.orders.events" in bed.status().get("message", "")
            and bed.status()
        ),
        timeout=30,
    )
    assert wrong["phase"] == "Pending" and wrong["conditions"]
