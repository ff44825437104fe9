"""The sidecar under real faults (issue 12): a real nats-server that is away, comes back
empty or refuses big messages; consumers that collide or vanish; slow and broken clients.
Every test runs the real sidecar process."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
from nats.js import api

from accord_operator.envtest.controlplane import free_port
from accord_sidecar.broker.nats import STREAM, durable_name, legacy_durable_name
from tests.support.dataplane import (
    NatsServer,
    ProjectorProcess,
    Recorder,
    Sidecar,
    request,
    subscriber,
    wait_until,
)


def _js(url: str, action: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run one JetStream action from the test, as an operator with the nats CLI would."""

    async def run() -> Any:
        nc = await nats.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def _publish(sidecar: Sidecar, topic: str, data: Any, **headers: str) -> tuple[int, Any]:
    status, body, _ = request("POST", f"{sidecar.api}/v1/publish/{topic}", data, headers=headers)
    return status, body


def _data(app: Recorder, topic: str) -> list[Any]:
    return [c["body"]["data"] for c in app.calls(f"/events/{topic}")]


def _ready(sidecar: Sidecar) -> tuple[int, Any]:
    status, body, _ = request("GET", f"http://127.0.0.1:{sidecar.admin_port}/readyz")
    return status, body


def _quiet_log(sidecar: Sidecar, after: str = "") -> str:
    text = sidecar.log.read_text()
    return text[text.find(after) :] if after else text


# -- 1. consumer names ----------------------------------------------------------------------


def test_apps_whose_joined_names_collide_each_get_only_their_own_topic(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """App "order" on "service-events" and app "order-service" on "events" once shared one
    JetStream consumer: events went to the wrong app and one topic was never delivered."""
    order: Recorder = spawn(Recorder, "order")
    order_service: Recorder = spawn(Recorder, "order-service")
    subscriber(spawn, nats.url, "order", "service-events", order)
    subscriber(spawn, nats.url, "order-service", "events", order_service)
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    for i in range(5):
        assert _publish(publisher, "service-events", {"se": i})[0] == 200
        assert _publish(publisher, "events", {"e": i})[0] == 200
    wait_until(lambda: len(_data(order, "service-events")) >= 5)
    wait_until(lambda: len(_data(order_service, "events")) >= 5)
    time.sleep(0.5)
    assert _data(order, "service-events") == [{"se": i} for i in range(5)]
    assert _data(order_service, "events") == [{"e": i} for i in range(5)]
    assert (
        order.calls("/events/events") == [] and order_service.calls("/events/service-events") == []
    )


def test_a_consumer_that_belongs_to_another_subscription_is_refused_and_reported(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    assert _publish(publisher, "payments", {"n": 0})[0] == 200  # the stream exists
    name = durable_name("projector", "orders")

    async def squat(js: Any) -> None:
        await js.add_consumer(
            STREAM,
            api.ConsumerConfig(
                durable_name=name, filter_subject="accord.payments", ack_policy="explicit"
            ),
        )

    _js(nats.url, squat)
    app: Recorder = spawn(Recorder, "projector")
    sidecar = subscriber(spawn, nats.url, "projector", "orders", app)
    wait_until(lambda: "not delivering from it" in json.dumps(_ready(sidecar)[1]))
    assert _ready(sidecar)[0] == 503
    assert "ERROR" in sidecar.log.read_text() and name in sidecar.log.read_text()
    assert _publish(publisher, "orders", {"n": 1})[0] == 200
    time.sleep(1.5)
    assert app.calls("/events/orders") == []  # nothing taken from the other subscription's
    assert app.calls("/events/payments") == []

    async def evict(js: Any) -> None:
        await js.delete_consumer(STREAM, name)

    _js(nats.url, evict)  # the operator removes the stray consumer: delivery starts
    wait_until(lambda: _data(app, "orders") == [{"n": 1}], timeout=40)
    wait_until(lambda: _ready(sidecar)[0] == 200)


# -- 3. a broker that comes back empty ---------------------------------------------------------


def test_a_broker_that_comes_back_empty_gets_its_stream_and_consumers_again(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    sub = subscriber(spawn, nats.url, "projector", "orders", app)
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    assert _publish(publisher, "orders", {"n": 1})[0] == 200
    wait_until(lambda: _data(app, "orders") == [{"n": 1}])

    nats.restart(lose_store=True)  # store lost: no stream, no consumer
    wait_until(lambda: _publish(publisher, "orders", {"n": 2})[0] == 200, timeout=60)
    wait_until(lambda: _data(app, "orders") == [{"n": 1}, {"n": 2}], timeout=60)
    assert "was missing on the broker; created it again" in publisher.log.read_text() + (
        sub.log.read_text()
    )
    # Its consumer made again: after a failed fetch, or found gone by its idle check.
    assert sub.log.read_text().count("created consumer") >= 2
    wait_until(lambda: _ready(sub)[0] == 200 and _ready(publisher)[0] == 200)

    async def drop(js: Any) -> None:  # the consumer alone deleted, the broker up
        await js.delete_consumer(STREAM, durable_name("projector", "orders"))

    _js(nats.url, drop)
    wait_until(lambda: "gone from the broker" in sub.log.read_text(), timeout=30)
    assert _publish(publisher, "orders", {"n": 3})[0] == 200
    wait_until(lambda: _data(app, "orders")[-1:] == [{"n": 3}], timeout=30)


def test_readyz_tells_the_truth_while_the_broker_is_away(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    sub = subscriber(spawn, nats.url, "projector", "orders", app)
    wait_until(lambda: _ready(sub)[0] == 200)
    nats.kill()
    _, body = wait_until(lambda: (r := _ready(sub))[0] == 503 and r)
    assert "pub/sub" in body["error"]["message"]
    nats.start()
    wait_until(lambda: _ready(sub)[0] == 200, timeout=30)


# -- 4. start without a broker -----------------------------------------------------------------


def test_the_sidecar_serves_at_once_without_a_broker_and_connects_when_it_comes(
    spawn: Callable[..., Any], tmp_path: Any
) -> None:
    nats = NatsServer(tmp_path)  # not started: nothing listens on its port
    app: Recorder = spawn(Recorder, "projector")
    sidecar: Sidecar = spawn(
        Sidecar,
        "projector",
        ACCORD_NATS_URL=nats.url,
        ACCORD_SUBSCRIBE="orders",
        ACCORD_APP_PORT=str(app.port),
        ACCORD_SERVICES=f"self=127.0.0.1:{app.port}",
    )  # spawn returns once its ports are open
    status, _, _ = request("GET", f"{sidecar.api}/v1/invoke/self/hello")
    assert status == 200  # invoke works with no broker
    status, body = _ready(sidecar)
    assert status == 503 and "pub/sub" in body["error"]["message"]
    assert "invoke and inbound calls work" in body["error"]["message"]
    status, body = _publish(sidecar, "orders", {"n": 1})
    assert status == 503 and body["error"]["code"] == "broker_unavailable"
    assert "connecting to NATS" in sidecar.log.read_text()
    try:
        nats.start()
        wait_until(lambda: _ready(sidecar)[0] == 200, timeout=30)
        assert _publish(sidecar, "orders", {"n": 2})[0] == 200
        wait_until(lambda: _data(app, "orders") == [{"n": 2}])
    finally:
        nats.close()


def test_sigterm_stops_a_sidecar_whose_broker_never_came(
    spawn: Callable[..., Any], tmp_path: Any
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    sidecar: Sidecar = spawn(
        Sidecar,
        "projector",
        ACCORD_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        ACCORD_SUBSCRIBE="orders",
        ACCORD_APP_PORT=str(app.port),
    )
    assert sidecar.terminate(timeout=15) == 0


# -- 5. raw paths ------------------------------------------------------------------------------


def _raw(method: str, port: int, target: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, target, skip_accept_encoding=True)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_invoke_and_inbound_forward_the_raw_path_exactly(spawn: Callable[..., Any]) -> None:
    app: Recorder = spawn(Recorder, "inventory")
    sidecar: Sidecar = spawn(
        Sidecar,
        "caller",
        ACCORD_SERVICES=f"inventory=127.0.0.1:{app.port}",
        ACCORD_APP_PORT=str(app.port),
        ACCORD_SHARED_TOKEN="t",
    )
    tricky = "/a%2Fb/%252e%252e/c%3Fd/%2e%2e/e?x=%2F1&y=a+b"
    assert _raw("GET", sidecar.http_port, "/v1/invoke/inventory" + tricky) == 200
    assert _raw("GET", sidecar.inbound_port, tricky, {"Authorization": "Bearer t"}) == 200
    assert [c["raw_path"] for c in app.calls()] == [tricky, tricky]
    # An encoded slash cannot smuggle a different service name.
    assert _raw("GET", sidecar.http_port, "/v1/invoke/inventory%2Fx/y") == 400


# -- 6, 10. metrics ----------------------------------------------------------------------------


def test_a_scrape_never_waits_on_the_broker(spawn: Callable[..., Any], nats: NatsServer) -> None:
    """Three subscriptions and the broker gone: the scrape answers at once (it used to ask
    the broker for each subscription's lag, 5 s each)."""
    app: Recorder = spawn(Recorder, "projector")
    sidecar = subscriber(spawn, nats.url, "projector", "a,b,c", app)
    wait_until(lambda: _ready(sidecar)[0] == 200)
    nats.kill()
    wait_until(lambda: _ready(sidecar)[0] == 503)
    for _ in range(3):
        status, text, _ = request(
            "GET", f"http://127.0.0.1:{sidecar.admin_port}/metrics", raw=True, timeout=3
        )
        assert status == 200 and "accord_sidecar_consumer_lag" in text


def test_metric_labels_are_bounded_and_standard_series_present(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    apps = [spawn(Recorder, f"t{i}") for i in range(3)]
    projector: Recorder = spawn(Recorder, "projector")
    projector.behave({"path": "/events/orders", "fail": 2, "status": 500})
    sidecar: Sidecar = spawn(
        Sidecar,
        "projector",
        ACCORD_NATS_URL=nats.url,
        ACCORD_SUBSCRIBE="orders",
        ACCORD_APP_PORT=str(projector.port),
        ACCORD_SERVICES=f"inventory=127.0.0.1:{apps[0].port}",
        ACCORD_POD_NAMESPACE="default",  # in a cluster: any name resolves, as callers choose
        ACCORD_REDELIVERY_INITIAL_MS="20",
        ACCORD_REDELIVERY_MAX_MS="50",
    )
    assert request("GET", f"{sidecar.api}/v1/invoke/inventory/x")[0] == 200
    for a in apps:  # names the caller chooses: one "other" series, not one per name
        assert request("GET", f"{sidecar.api}/v1/invoke/127.0.0.1:{a.port}/x")[0] == 200
    for topic in ("orders", "made-up-1", "made-up-2"):
        assert _publish(sidecar, topic, {"n": 1})[0] == 200
    wait_until(lambda: sidecar.metric("accord_sidecar_deliveries_total", topic="orders",
                                      outcome="success") == 1)  # fmt: skip
    text = request("GET", f"http://127.0.0.1:{sidecar.admin_port}/metrics", raw=True)[1]
    targets = {line.split('target="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("accord_sidecar_outbound_requests_total{")}  # fmt: skip
    assert targets == {"inventory", "other"}
    assert sidecar.metric("accord_sidecar_outbound_requests_total", target="other",
                          status="200") == 3  # fmt: skip
    topics = {line.split('topic="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("accord_sidecar_published_total{")}  # fmt: skip
    assert topics == {"orders", "other"}
    assert "_created" not in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    # Two failed deliveries, then success: the broker delivered it 3 times, 2 of them again.
    assert sidecar.metric("accord_sidecar_redeliveries_total", topic="orders") == 2
    assert sidecar.metric("accord_sidecar_deliveries_total", topic="orders", outcome="retry") == 2


# -- 7, 8. publish limits and ids --------------------------------------------------------------


def test_an_event_over_the_brokers_max_payload_is_refused_at_once_naming_the_limit(
    spawn: Callable[..., Any], tmp_path: Any
) -> None:
    nats = NatsServer(tmp_path, max_payload=4096).start()
    try:
        sidecar: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
        wait_until(lambda: _ready(sidecar)[0] == 200)
        status, body = _publish(sidecar, "orders", {"blob": "x" * 5000})
        assert status == 413 and "4096" in body["error"]["message"]
        batch = json.dumps(
            [
                {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"},
                {"specversion": "1.0", "id": "2", "source": "/s", "type": "t", "data": "x" * 5000},
            ]
        ).encode()
        status, body, _ = request(
            "POST",
            f"{sidecar.api}/v1/publish/orders",
            data=batch,
            headers={"Content-Type": "application/cloudevents-batch+json"},
        )
        assert status == 413 and body["error"]["message"].startswith("event [1]")
        assert _publish(sidecar, "orders", {"small": True})[0] == 200  # still connected
    finally:
        nats.close()


def test_a_plain_publish_retried_with_its_id_is_stored_once(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    subscriber(spawn, nats.url, "projector", "orders", app)
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    key = {"Accord-Idempotency-Key": "order-7-placed"}
    first = _publish(publisher, "orders", {"n": 7}, **key)[1]
    again = _publish(publisher, "orders", {"n": 7}, **key)[1]
    assert first["id"] == again["id"] == "order-7-placed"
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    wait_until(lambda: _data(app, "orders") == [{"n": 7}])
    nats.kill()
    status, body = _publish(publisher, "orders", {"n": 8}, **key)
    assert status == 503 and "publish it again with the same id" in body["error"]["message"]


# -- 9. CloudEvents with the official SDK ------------------------------------------------------


def test_the_official_sdk_parses_every_event_the_sidecar_delivers(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    from cloudevents.core.bindings import http as ce_http
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    app: Recorder = spawn(Recorder, "projector")
    app.behave({"path": "/events/orders", "fail": 99, "status": 500, "id": "poison"})
    bulk: Recorder = spawn(Recorder, "bulk")
    subscriber(spawn, nats.url, "projector", "orders,orders.dlq", app, ACCORD_MAX_DELIVERIES="2")
    subscriber(spawn, nats.url, "bulk", "orders", bulk, ACCORD_BULK_MAX="10")
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    url = f"{publisher.api}/v1/publish/orders"
    sent: list[CloudEvent] = [
        CloudEvent({"id": "bin-1", "source": "/s", "type": "t", "subject": "ü 100% \"x\"",
                    "topic": "billing", "datacontenttype": "text/plain; charset=utf-8"}, "ok ✓"),
        CloudEvent({"id": "bin-2", "source": "/s", "type": "t", "datacontenttype":
                    "application/octet-stream"}, b"\x00\x01\xff"),
        CloudEvent({"id": "poison", "source": "/s", "type": "t", "n": 5,
                    "datacontenttype": "application/json"}, {"bad": True}),
    ]  # fmt: skip
    for i, event in enumerate(sent):
        message = (ce_http.to_binary if i % 2 == 0 else ce_http.to_structured)(event, JSONFormat())
        assert request("POST", url, data=message.body, headers=dict(message.headers))[0] == 200
    for body, ctype in ((b'{"plain": 1}', "application/json; charset=utf-8"),
                        ("déjà".encode("latin-1"), "text/plain; charset=latin-1"),
                        (b"\x89PNG", "image/png")):  # fmt: skip
        assert request("POST", url, data=body, headers={"Content-Type": ctype})[0] == 200
    wait_until(lambda: len(app.calls("/events/orders.dlq")) == 1, timeout=60)
    wait_until(lambda: sum(len(c["body"]) for c in bulk.calls("/events/orders")) >= 6, timeout=60)
    delivered = [c["body"] for c in app.calls("/events/orders")]
    delivered += [e for c in bulk.calls("/events/orders") for e in c["body"]]
    delivered += [c["body"] for c in app.calls("/events/orders.dlq")]
    parsed = {}
    for event in delivered:
        got = JSONFormat().read(CloudEvent, json.dumps(event).encode())  # raises if invalid
        parsed[got.get_id()] = got
    one = parsed["bin-1"]
    assert one.get_subject() == 'ü 100% "x"' and one.get_data() == "ok ✓"
    assert one.get_extension("topic") == "billing"  # the producer's, never overwritten
    assert one.get_datacontenttype() == "text/plain; charset=utf-8"
    assert parsed["bin-2"].get_data() == b"\x00\x01\xff"
    data = [e.get_data() for e in parsed.values()]
    assert "déjà" in data and b"\x89PNG" in data and {"plain": 1} in data
    dead = next(c["body"] for c in app.calls("/events/orders.dlq"))
    assert dead["id"] == "poison" and dead["deadlettertopic"] == "orders"


# -- 11, 12. slow and broken clients ------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes the connection while the client trickles bytes."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.3)
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.send(trickle)
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_slow_client_cannot_hold_connections(spawn: Callable[..., Any]) -> None:
    sidecar: Sidecar = spawn(
        Sidecar,
        "web",
        ACCORD_SHARED_TOKEN="t",
        ACCORD_APP_PORT=str(free_port()),
        ACCORD_HEADER_TIMEOUT_S="1",
        ACCORD_BODY_TIMEOUT_S="1",
    )
    for port in (sidecar.http_port, sidecar.inbound_port, sidecar.admin_port):
        s = socket.create_connection(("127.0.0.1", port))
        s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(s, 15, trickle=b"X"), f"port {port} kept a slowloris connection"
        s.close()
    # A body that trickles: a 408, and the connection closes.
    s = socket.create_connection(("127.0.0.1", sidecar.http_port))
    s.send(b"POST /v1/invoke/self/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
           b"Content-Type: application/json\r\n\r\n{")  # fmt: skip
    s.settimeout(15)
    assert b" 408 " in s.recv(4096).split(b"\r\n")[0]
    s.close()


def test_the_inbound_port_authenticates_before_it_reads_a_body(spawn: Callable[..., Any]) -> None:
    sidecar: Sidecar = spawn(
        Sidecar, "web", ACCORD_SHARED_TOKEN="t", ACCORD_APP_PORT=str(free_port())
    )
    for expect in (b"Expect: 100-continue\r\n", b""):
        s = socket.create_connection(("127.0.0.1", sidecar.inbound_port))
        s.send(b"POST /charge HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n" + expect
               + b"Authorization: Bearer wrong\r\n\r\n")  # fmt: skip
        s.settimeout(10)
        first = s.recv(4096).split(b"\r\n")[0]
        assert b" 401 " in first, first  # not "100 Continue", and no body was sent
        s.close()


def test_broken_requests_get_4xx_and_leave_no_error_in_the_log(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    sidecar: Sidecar = spawn(Sidecar, "web", ACCORD_NATS_URL=nats.url)
    deep = b"[" * 50_000 + b"]" * 50_000
    status, body, _ = request("POST", f"{sidecar.api}/v1/publish/orders", data=deep,
                              headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    # An upload the client abandons half-way.
    s = socket.create_connection(("127.0.0.1", sidecar.http_port))
    s.send(b'POST /v1/publish/orders HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"a"')
    time.sleep(0.2)
    s.close()
    # Requests that are not HTTP.
    for junk in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"\x16\x03\x01\x00"):
        s = socket.create_connection(("127.0.0.1", sidecar.http_port))
        s.send(junk)
        s.settimeout(5)
        with contextlib.suppress(OSError):
            s.recv(4096)
        s.close()
    assert request("GET", f"http://127.0.0.1:{sidecar.admin_port}/healthz")[0] == 200
    time.sleep(0.5)
    log = sidecar.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_idle_shutdown_with_subscriptions_is_quick_and_quiet(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    sidecar = subscriber(spawn, nats.url, "projector", "a,b,c", app,
                          ACCORD_SHUTDOWN_GRACE_S="60")  # fmt: skip
    wait_until(lambda: _ready(sidecar)[0] == 200)
    # Well inside the grace: an idle sidecar has nothing to wait for.
    assert sidecar.terminate(timeout=20) == 0
    tail = _quiet_log(sidecar, after="shutting down")
    assert "WARNING" not in tail and "ERROR" not in tail and "Traceback" not in tail, tail


# -- 13. the stream's settings -----------------------------------------------------------------


def test_stream_limits_and_where_new_subscriptions_start_are_configurable(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    publisher: Sidecar = spawn(
        Sidecar,
        "api",
        ACCORD_NATS_URL=nats.url,
        ACCORD_STREAM_MAX_AGE_S="3600",
        ACCORD_STREAM_MAX_BYTES="50000000",
    )
    for i in range(3):
        assert _publish(publisher, "orders", {"old": i})[0] == 200

    async def info(js: Any) -> Any:
        return (await js.stream_info(STREAM)).config

    config = _js(nats.url, info)
    assert (config.max_age, config.max_bytes) == (3600, 50_000_000)
    newcomer: Recorder = spawn(Recorder, "newcomer")
    sub = subscriber(spawn, nats.url, "newcomer", "orders", newcomer,
                      ACCORD_NEW_SUBSCRIPTIONS_START="new")  # fmt: skip
    wait_until(lambda: _ready(sub)[0] == 200)
    assert _publish(publisher, "orders", {"new": 1})[0] == 200
    wait_until(lambda: _data(newcomer, "orders") == [{"new": 1}])
    replayer: Recorder = spawn(Recorder, "replayer")
    subscriber(spawn, nats.url, "replayer", "orders", replayer)  # default: all
    wait_until(lambda: len(_data(replayer, "orders")) == 4)


def test_an_upgrade_carries_on_from_the_old_consumers_position(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """Consumers made by sidecars before injective names: the new one starts where the old
    one's acks stood, not from the start of the stream."""
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    for i in range(3):
        assert _publish(publisher, "orders", {"n": i})[0] == 200
    legacy = legacy_durable_name("projector", "orders")

    async def old_sidecar(js: Any) -> None:
        await js.add_consumer(
            STREAM,
            api.ConsumerConfig(
                durable_name=legacy, filter_subject="accord.orders", ack_policy="explicit"
            ),
        )
        sub = await js.pull_subscribe_bind(legacy, stream=STREAM)
        for m in await sub.fetch(2, timeout=5):
            await m.ack_sync()

    _js(nats.url, old_sidecar)
    app: Recorder = spawn(Recorder, "projector")
    subscriber(spawn, nats.url, "projector", "orders", app)
    wait_until(lambda: _data(app, "orders") == [{"n": 2}])
    time.sleep(0.5)
    assert _data(app, "orders") == [{"n": 2}]

    async def names(js: Any) -> list[str]:
        return [c.name for c in await js.consumers_info(STREAM)]

    assert _js(nats.url, names) == [durable_name("projector", "orders")]


# -- poison events park their key ---------------------------------------------------------------


def _dead_letters(url: str, topic: str) -> list[dict[str, Any]]:
    async def read(js: Any) -> list[dict[str, Any]]:
        sub = await js.pull_subscribe(f"accord.{topic}.dlq", stream=STREAM)
        try:
            return [json.loads(m.data) for m in await sub.fetch(100, timeout=2)]
        finally:
            await sub.unsubscribe()

    result: list[dict[str, Any]] = _js(url, read)
    return result


def test_a_poison_event_parks_only_its_key_until_retried_or_skipped(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """ACCORD_POISON=park: after max deliveries the event goes to the dead-letter topic and
    its key is parked: later events of that key wait (kept, in order, on the broker), other
    keys go on. A retry (the operator's request, here written as it would) delivers the
    parked events in order; a skip drops the poison event and delivers the rest."""
    app: Recorder = spawn(Recorder, "projector")
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)

    def publish(key: str, n: int) -> str:
        status, body = _publish(publisher, "orders", {"key": key, "n": n},
                                **{"Accord-Partition-Key": key,
                                   "Accord-Idempotency-Key": f"{key}{n}"})  # fmt: skip
        assert status == 200 and body["id"] == f"{key}{n}", body
        return str(body["id"])

    a1, b1 = publish("a", 1), publish("b", 1)
    app.behave({"path": "/events/orders", "id": (a2 := publish("a", 2)), "status": 500})
    a3, b2 = publish("a", 3), publish("b", 2)
    sub = subscriber(spawn, nats.url, "projector", "orders", app,
                     ACCORD_POISON="park", ACCORD_MAX_DELIVERIES="2")  # fmt: skip

    def ids() -> list[str]:
        return [c["body"]["id"] for c in app.calls("/events/orders")]

    wait_until(lambda: b2 in ids())
    time.sleep(0.5)
    assert ids() == [a1, b1, a2, a2, b2]  # a3 waits behind a2; b goes on
    assert "parked with its key 'a'" in sub.log.read_text()
    b3 = publish("b", 3)
    a4 = publish("a", 4)  # parked too: a is parked
    wait_until(lambda: b3 in ids())
    time.sleep(0.3)
    assert a4 not in ids() and a3 not in ids()
    assert [e["id"] for e in _dead_letters(nats.url, "orders")] == [a2]

    consumer = durable_name("projector", "orders")

    async def ask(js: Any, action: str, nonce: str) -> None:
        kv = await js.key_value("ACCORD_OWNERS")
        await kv.put(f"cmd.{consumer}", json.dumps({"action": action, "nonce": nonce}).encode())

    async def done(js: Any) -> str:
        kv = await js.key_value("ACCORD_OWNERS")
        try:
            return (await kv.get(f"done.{consumer}")).value.decode()
        except Exception:
            return ""

    app.behave(reset=True)  # the fix: a2 goes through now
    _js(nats.url, lambda js: ask(js, "retry", "n1"))
    wait_until(lambda: _js(nats.url, done) == "n1")
    assert ids()[-3:] == [a2, a3, a4]  # in order, after the fix
    a5 = publish("a", 5)  # no longer parked
    wait_until(lambda: a5 in ids())

    # Skip: the poison event is dropped, those behind it delivered.
    app.behave({"path": "/events/orders", "id": "a6", "status": 500})  # before it is published
    a6 = publish("a", 6)
    a7 = publish("a", 7)
    wait_until(lambda: ids().count(a6) == 2)
    time.sleep(0.5)
    assert a7 not in ids()
    _js(nats.url, lambda js: ask(js, "skip", "n2"))
    wait_until(lambda: _js(nats.url, done) == "n2")
    assert ids()[-1] == a7 and ids().count(a6) == 2  # a6 not delivered again


@pytest.mark.parametrize("poison", ["park", "dead-letter"])
def test_in_a_batch_only_the_poison_event_is_dead_lettered_not_those_held_behind_it(
    spawn: Callable[..., Any], nats: NatsServer, poison: str
) -> None:
    """Batches of 100, in order: the projector refuses o-3 and holds back (RETRY) the later
    events of its customer, c3. Only o-3 counts attempts and reaches max deliveries: it
    alone is dead-lettered (and counted once); o-8 and o-13 are parked behind it, or, not
    parking, delivered after it (each with attempts of its own)."""
    publisher: Sidecar = spawn(Sidecar, "api", ACCORD_NATS_URL=nats.url)
    for i in range(15):  # all stored first: they reach the projector in one batch
        event, key = {"customer": f"c{i % 5}", "amountCents": 1}, f"c{i % 5}"
        headers = {"Accord-Partition-Key": key, "Accord-Idempotency-Key": f"o-{i}"}  # its id
        assert _publish(publisher, "orders", event, **headers)[0] == 200
    port = free_port()
    app: ProjectorProcess = spawn(ProjectorProcess, port, 0, "orders")
    request("POST", f"{app.url}/_behave", {"failIds": ["o-3"]})
    spawn(Sidecar, "projector-sidecar", ACCORD_NATS_URL=nats.url, ACCORD_SUBSCRIBE="orders",
          ACCORD_APP_PORT=str(port), ACCORD_BULK_MAX="100", ACCORD_MAX_DELIVERIES="2",
          ACCORD_REDELIVERY_INITIAL_MS="20", ACCORD_REDELIVERY_MAX_MS="100",
          **({"ACCORD_POISON": "park"} if poison == "park" else {}))  # fmt: skip

    def model() -> dict[str, Any]:
        found: dict[str, Any] = request("GET", f"{app.url}/orders")[1]
        return found

    want = 12 if poison == "park" else 14
    wait_until(lambda: model()["events"] == want)
    time.sleep(1)  # time enough for a wrong second dead letter, or a late delivery
    assert [e["id"] for e in _dead_letters(nats.url, "orders")] == ["o-3"]
    assert model()["events"] == want
    assert model()["customers"].get("c3", {}).get("orders", 0) == (0 if poison == "park" else 2)

    async def counted(js: Any) -> int:
        kv = await js.key_value("ACCORD_COUNTS")
        return int((await kv.get(f"dead.{durable_name('projector-sidecar', 'orders')}")).value)

    assert _js(nats.url, counted) == 1


def _publish_keyed(publisher: Sidecar, numbers: range, keys: int) -> set[str]:
    """Publish {"n": i} to "orders" for each i, with partition key k<i % keys>: the ids."""
    ids = set()
    for i in numbers:
        status, body, _ = request("POST", f"{publisher.api}/v1/publish/orders", {"n": i},
                                  headers={"Accord-Partition-Key": f"k{i % keys}"})  # fmt: skip
        assert status == 200, body
        ids.add(body["id"])
    return ids


def _delivered_to(app: Recorder) -> set[str]:
    """The ids of the "orders" events the app has taken (one by one or in batches); none
    while it is down."""
    out: set[str] = set()
    with contextlib.suppress(OSError):
        for call in app.calls("/events/orders"):
            body = call["body"]
            out |= {e["id"] for e in (body if isinstance(body, list) else [body])}
    return out


@pytest.mark.parametrize(
    "mode",
    [
        {},  # ordered, one event per POST
        {"ACCORD_BULK_MAX": "10", "ACCORD_POISON": "park"},  # as a projection's sidecar
        {"ACCORD_PARTITIONS": "2", "ACCORD_BULK_MAX": "10", "ACCORD_HTTP_ENGINE": "aiohttp"},
        {"ACCORD_CONCURRENCY": "4"},
    ],
    ids=["ordered", "bulk-park", "partitioned-aiohttp", "concurrent"],
)
def test_an_app_not_listening_yet_or_restarting_costs_no_event_a_delivery_attempt(
    spawn: Callable[..., Any], nats: NatsServer, mode: dict[str, str]
) -> None:
    """A pod's sidecar may be up before its app listens, and an app restarts: a POST that
    finds no one listening never reached the app, so it is no failed attempt of the event
    (with max deliveries 2, counting it would dead-letter). Deliveries wait, /readyz says
    why, and every event arrives once the app is back."""
    app: Recorder = spawn(Recorder, "projector")
    app.kill()  # its port is known; nothing listens there yet
    publisher: Sidecar = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    sidecar = subscriber(spawn, nats.url, "projector", "orders", app,
                         ACCORD_MAX_DELIVERIES="2", **mode)  # fmt: skip

    def publish(first: int, n: int) -> set[str]:
        return _publish_keyed(publisher, range(first, first + n), keys=3)

    def delivered() -> set[str]:
        return _delivered_to(app)

    sent = publish(0, 12)
    status, _, _ = wait_until(
        lambda: (
            (r := request("GET", f"http://127.0.0.1:{sidecar.admin_port}/readyz"))
            and "not listening" in json.dumps(r[1])
            and r
        ),
        message="/readyz never said the app is not listening",
    )
    assert status == 503
    time.sleep(1.5)  # many looks at the closed port meanwhile
    app.start()
    wait_until(lambda: delivered() >= sent, timeout=30, message="events lost")

    app.kill()  # the app restarts mid-stream
    more = publish(12, 6)
    time.sleep(1.5)
    app.start()  # a new process: what it records starts afresh
    wait_until(lambda: delivered() >= more, timeout=30, message="events lost")
    assert sidecar.metric("accord_sidecar_dead_lettered_total", topic="orders") == 0
    assert "parked" not in sidecar.log.read_text()
    wait_until(lambda: request("GET", f"http://127.0.0.1:{sidecar.admin_port}/readyz")[0] == 200)


def test_a_replica_up_before_its_app_shares_its_partitions_and_is_ready_once_the_app_is(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    """As in a pod of a partitioned projection: the first replica up takes every partition
    while its app does not listen yet, and gives one up when the second joins. Once its app
    listens it is ready: the partition it now only stands by for keeps no stale 'not
    listening' (the in-cluster test saw such a pod never ready), and every event arrives."""
    apps: list[Recorder] = [spawn(Recorder, f"projector-{i}") for i in range(2)]
    apps[0].kill()  # its port is known; nothing listens there yet
    publisher: Sidecar = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    env = {"ACCORD_APP_ID": "projector", "ACCORD_MAX_DELIVERIES": "2",
           "ACCORD_PARTITIONS": "2", "ACCORD_BULK_MAX": "10"}  # fmt: skip
    first = subscriber(spawn, nats.url, "projector-0", "orders", apps[0], **env)
    wait_until(lambda: "takes partitions 0,1" in first.log.read_text(), timeout=30)
    sent = _publish_keyed(publisher, range(12), keys=6)
    ready = f"http://127.0.0.1:{first.admin_port}/readyz"
    wait_until(lambda: "not listening" in json.dumps(request("GET", ready)[1]),
               message="/readyz never said the app is not listening")  # fmt: skip

    second = subscriber(spawn, nats.url, "projector-1", "orders", apps[1], **env)
    wait_until(lambda: "2 replica(s)" in first.log.read_text(), timeout=30,
               message="the first replica never shared its partitions out")  # fmt: skip
    apps[0].start()
    wait_until(lambda: _delivered_to(apps[0]) | _delivered_to(apps[1]) >= sent, timeout=30,
               message="events lost")  # fmt: skip
    for sidecar in (first, second):
        url = f"http://127.0.0.1:{sidecar.admin_port}/readyz"
        wait_until(lambda u=url: request("GET", u)[0] == 200, timeout=15,
                   message=f"a replica stayed unready: {request('GET', url)[1]}")  # fmt: skip
        assert sidecar.metric("accord_sidecar_dead_lettered_total", topic="orders") == 0


@pytest.mark.parametrize("partitions", ["1", "2"], ids=["ordered", "partitioned"])
def test_a_replica_whose_app_stays_down_hands_its_ordered_deliveries_to_another(
    spawn: Callable[..., Any], nats: NatsServer, partitions: str
) -> None:
    """Two replicas of an ordered (or partitioned) subscription, each with its own app. One
    app dies and stays down while its sidecar runs: after APP_DOWN_HANDOVER_S its sidecar
    gives up what it delivered, the other replica delivers everything, nothing is
    dead-lettered; once the app is back its replica takes its share again."""
    apps: list[Recorder] = [spawn(Recorder, f"projector-{i}") for i in range(2)]
    publisher: Sidecar = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    env = {"ACCORD_APP_ID": "projector", "ACCORD_MAX_DELIVERIES": "2",
           "ACCORD_PARTITIONS": partitions}  # fmt: skip
    sidecars = [subscriber(spawn, nats.url, f"projector-{i}", "orders", apps[i], **env)
                for i in range(2)]  # fmt: skip

    def publish(first: int, n: int) -> set[str]:
        return _publish_keyed(publisher, range(first, first + n), keys=6)

    delivered = _delivered_to

    def delivering(sidecar: Sidecar) -> bool:
        return "this sidecar delivers" in sidecar.log.read_text()

    wait_until(lambda: all(map(delivering, sidecars)) if partitions == "2"
               else any(map(delivering, sidecars)), timeout=30)  # fmt: skip
    first = publish(0, 12)
    wait_until(lambda: delivered(apps[0]) | delivered(apps[1]) >= first, message="events lost")
    down = 0 if delivered(apps[0]) else 1  # an app that delivers
    apps[down].kill()
    later = publish(12, 12)
    wait_until(lambda: delivered(apps[1 - down]) >= later, timeout=60,
               message="the other replica never took the deliveries over")  # fmt: skip
    assert "not listening" in sidecars[down].log.read_text()
    for sidecar in sidecars:
        assert sidecar.metric("accord_sidecar_dead_lettered_total", topic="orders") == 0

    mark = len(sidecars[down].log.read_text())
    apps[down].start()  # back: its replica takes its share again (or stands by: ready)
    ready = f"http://127.0.0.1:{sidecars[down].admin_port}/readyz"
    wait_until(lambda: request("GET", ready)[0] == 200, timeout=30,
               message=f"the replica stayed unready: {request('GET', ready)[1]}")  # fmt: skip
    if partitions == "2":

        def rejoined() -> bool:
            since = sidecars[down].log.read_text()[mark:]
            return "2 replica(s)" in since and "this sidecar delivers" in since

        wait_until(rejoined, timeout=30, message="the replica never took its share again")
        last = publish(24, 12)
        wait_until(lambda: delivered(apps[0]) | delivered(apps[1]) >= last, message="events lost")
        assert delivered(apps[down]) & last  # its partition's
