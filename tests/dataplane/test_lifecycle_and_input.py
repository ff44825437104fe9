"""Graceful shutdown, health and readiness, and bad input that must never break the sidecar."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.dataplane import NatsServer, Recorder, Sidecar, request, wait_until


def test_sigterm_finishes_the_delivery_in_flight_and_exits_zero(
    spawn: Callable[..., Any], nats: NatsServer
) -> None:
    app: Recorder = spawn(Recorder, "projector")
    app.behave({"path": "/events/orders", "delayMs": 1500, "fail": 1})
    publisher: Sidecar = spawn(Sidecar, "orders-api", ACCORD_NATS_URL=nats.url)
    subscriber: Sidecar = spawn(
        Sidecar,
        "projector",
        ACCORD_NATS_URL=nats.url,
        ACCORD_SUBSCRIBE="orders",
        ACCORD_APP_PORT=str(app.port),
    )
    request("POST", f"{publisher.api}/v1/publish/orders", {"n": 1})
    wait_until(lambda: app.calls("/events/orders"))  # the slow delivery has started
    assert subscriber.terminate() == 0
    subscriber.start()  # if the first delivery had not been acked, it would come again
    request("POST", f"{publisher.api}/v1/publish/orders", {"n": 2})
    wait_until(lambda: len(app.calls("/events/orders")) >= 2)
    time.sleep(0.5)
    assert [c["body"]["data"] for c in app.calls("/events/orders")] == [{"n": 1}, {"n": 2}]


def test_shutdown_endpoint_lets_a_job_finish(spawn: Callable[..., Any]) -> None:
    sidecar: Sidecar = spawn(Sidecar, "job")
    status, _, _ = request("POST", f"{sidecar.api}/v1/shutdown")
    assert status == 202
    assert sidecar.proc is not None and sidecar.proc.wait(timeout=30) == 0


def test_health_and_readiness(spawn: Callable[..., Any], tmp_path: Path) -> None:
    app = Recorder(tmp_path, "late-app")  # not started yet
    sidecar: Sidecar = spawn(Sidecar, "web", ACCORD_APP_PORT=str(app.port))
    admin = f"http://127.0.0.1:{sidecar.admin_port}"
    assert request("GET", f"{admin}/healthz")[0] == 200
    status, body, _ = request("GET", f"{admin}/readyz")
    assert status == 503 and f"app port {app.port} not reachable" in body["error"]["message"]
    app.start()
    try:
        assert wait_until(lambda: request("GET", f"{admin}/readyz")[0] == 200)
    finally:
        app.close()
    metrics = request("GET", f"{admin}/metrics", raw=True)[1]
    assert "accord_sidecar_build_info" in metrics


# -- property-based bad input: never a 5xx the sidecar caused ------------------------------


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("fuzz")
    nats = NatsServer(tmp).start()
    app = Recorder(tmp, "app").start()
    sidecar = Sidecar(
        tmp,
        "fuzzed",
        ACCORD_NATS_URL=nats.url,
        ACCORD_APP_PORT=str(app.port),
        ACCORD_SHARED_TOKEN="t",
        ACCORD_SERVICES=f"app=127.0.0.1:{app.port}",
        ACCORD_MAX_BODY_BYTES="4096",
    ).start()
    yield sidecar
    for p in (sidecar, app, nats):
        p.close()


_segment = st.text(st.characters(codec="utf-8", exclude_characters="/?#\x00"), max_size=20)
_bodies = st.one_of(st.binary(max_size=6000), st.text(max_size=200).map(str.encode))
_content_types = st.sampled_from(
    [
        "application/json",
        "application/cloudevents+json",
        "text/plain",
        "application/octet-stream",
        "application/x+json",
        "garbage/;;",
    ]
)


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


FUZZ = settings(
    max_examples=int(os.environ.get("ACCORD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(topic=_segment, body=_bodies, content_type=_content_types, ce=st.booleans())
def test_publish_bad_input(
    fuzz_target: Sidecar, topic: str, body: bytes, content_type: str, ce: bool
) -> None:
    headers = {"Content-Type": content_type}
    if ce:
        headers.update({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "s"})
    status, answer, _ = request(
        "POST", f"{fuzz_target.api}/v1/publish/{_quote(topic) or 'x'}", data=body, headers=headers
    )
    assert status in (200, 400, 404, 413), (status, answer)
    if status != 200:
        assert "error" in answer


@FUZZ
@given(
    service=_segment,
    path=_segment,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    body=_bodies,
)
def test_invoke_bad_input(
    fuzz_target: Sidecar, service: str, path: str, method: str, body: bytes
) -> None:
    name = service or "app"
    status, answer, _ = request(
        method,
        # Under fuzz/: the recorder's own /_ control endpoints are not what is being tested.
        f"{fuzz_target.api}/v1/invoke/{_quote(name)}/fuzz/{_quote(path)}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    if name == "app":
        assert status in (200, 413), (status, answer)  # the healthy app answers, or the size limit
    else:
        # Not a service name, or not a known one: refused, and no lookup leaves the machine.
        assert status in (400, 404, 413), (status, answer)


# Header values as HTTP allows them (no CR/LF); latin-1, as the wire is bytes.
_header_values = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=600
)


@FUZZ
@given(key=_header_values, body=_bodies, token=st.sampled_from(["t", "x", ""]))
def test_inbound_bad_input(fuzz_target: Sidecar, key: str, body: bytes, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    headers["Accord-Idempotency-Key"] = key
    status, answer, _ = request(
        "POST", f"{fuzz_target.inbound}/anything", data=body, headers=headers
    )
    assert status in (200, 400, 401, 413), (status, answer)
