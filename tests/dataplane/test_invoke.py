"""Outbound invoke through the real sidecar to a real service: retries, breaker, budget."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.support.dataplane import Recorder, Sidecar, request

KEY = {"Accord-Idempotency-Key": "order-1001-reserve"}


def _sidecar(spawn: Callable[..., Any], target: Recorder, **env: str) -> Sidecar:
    base = {
        "ACCORD_SERVICES": f"inventory={target.url.removeprefix('http://')}",
        "ACCORD_RETRY_INITIAL_MS": "10",
        "ACCORD_RETRY_MAX_MS": "50",
    }
    sidecar: Sidecar = spawn(Sidecar, "caller", **{**base, **env})
    return sidecar


def test_retries_then_success(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    inventory.behave({"path": "/reserve", "fail": 2, "status": 503})
    sidecar = _sidecar(spawn, inventory)
    status, body, headers = request(
        "POST", f"{sidecar.api}/v1/invoke/inventory/reserve?sku=42", {"qty": 1}, headers=KEY
    )
    assert status == 200 and body["n"] == 3
    assert headers["Accord-Attempts"] == "3"
    calls = inventory.calls("/reserve")
    assert len(calls) == 3
    # Method, query, headers and body are forwarded on every attempt.
    assert all(
        c["method"] == "POST" and c["query"] == "sku=42" and c["body"] == {"qty": 1} for c in calls
    )
    assert all(c["headers"]["Accord-Idempotency-Key"] == "order-1001-reserve" for c in calls)
    assert sidecar.metric("accord_sidecar_retries_total", target="inventory") == 2
    assert (
        sidecar.metric("accord_sidecar_outbound_requests_total", target="inventory", status="200")
        == 1
    )


def test_post_without_idempotency_key_is_not_retried(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    inventory.behave({"path": "/reserve", "fail": 1, "status": 503})
    sidecar = _sidecar(spawn, inventory)
    status, _, _ = request("POST", f"{sidecar.api}/v1/invoke/inventory/reserve", {"qty": 1})
    assert status == 503
    assert len(inventory.calls("/reserve")) == 1
    # A GET is idempotent by definition and is retried.
    inventory.behave({"path": "/stock", "fail": 1, "status": 503})
    assert request("GET", f"{sidecar.api}/v1/invoke/inventory/stock")[0] == 200
    assert len(inventory.calls("/stock")) == 2


def test_business_refusal_is_not_retried(spawn: Callable[..., Any]) -> None:
    payment: Recorder = spawn(Recorder, "payment")
    payment.behave({"path": "/charge", "status": 402, "body": {"error": "declined"}})
    sidecar = _sidecar(spawn, payment)
    status, body, _ = request("POST", f"{sidecar.api}/v1/invoke/inventory/charge", {}, headers=KEY)
    assert status == 402 and body == {"error": "declined"}
    assert len(payment.calls("/charge")) == 1


def test_retry_after_is_honoured(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    inventory.behave({"path": "/reserve", "fail": 1, "status": 429, "retryAfter": "1"})
    sidecar = _sidecar(spawn, inventory, ACCORD_RETRY_MAX_MS="5000")
    started = time.monotonic()
    assert request("POST", f"{sidecar.api}/v1/invoke/inventory/reserve", {}, headers=KEY)[0] == 200
    assert time.monotonic() - started >= 1.0  # waited as told, not its own 10 ms backoff


def test_timeout_is_a_retryable_failure(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    inventory.behave({"path": "/slow", "fail": 1, "delayMs": 3000})
    sidecar = _sidecar(spawn, inventory, ACCORD_TIMEOUT_MS="500")
    status, body, headers = request("GET", f"{sidecar.api}/v1/invoke/inventory/slow")
    assert status == 200 and headers["Accord-Attempts"] == "2"
    inventory.behave({"path": "/slow", "delayMs": 3000})
    status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/inventory/slow")
    assert status == 504 and body["error"]["code"] == "timeout"


def test_breaker_opens_fails_fast_and_recovers(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    inventory.behave({"path": "/reserve", "status": 500})
    sidecar = _sidecar(
        spawn,
        inventory,
        ACCORD_BREAKER_FAILURES="3",
        ACCORD_BREAKER_COOLDOWN_MS="700",
        ACCORD_RETRY_MAX_ATTEMPTS="1",
    )
    url = f"{sidecar.api}/v1/invoke/inventory/reserve"
    assert [request("POST", url, {}, headers=KEY)[0] for _ in range(3)] == [500, 500, 500]
    status, body, _ = request("POST", url, {}, headers=KEY)
    assert status == 503 and body["error"]["code"] == "circuit_open"
    assert len(inventory.calls("/reserve")) == 3  # the fast failure never reached the service
    assert sidecar.metric("accord_sidecar_breaker_state", target="inventory") == 1

    inventory.behave()  # healthy again
    time.sleep(0.8)  # the cool-down: one half-open probe goes through
    assert request("POST", url, {}, headers=KEY)[0] == 200
    assert request("POST", url, {}, headers=KEY)[0] == 200
    assert sidecar.metric("accord_sidecar_breaker_state", target="inventory") == 0


def test_retry_budget_keeps_retries_from_multiplying_load(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    inventory.behave({"path": "/stock", "status": 503})
    sidecar = _sidecar(
        spawn,
        inventory,
        ACCORD_RETRY_MAX_ATTEMPTS="5",
        ACCORD_RETRY_INITIAL_MS="1",
        ACCORD_RETRY_MAX_MS="2",
        ACCORD_RETRY_BUDGET_PERCENT="20",
        ACCORD_BREAKER_FAILURES="10000",
    )
    n = 60
    for _ in range(n):
        assert request("GET", f"{sidecar.api}/v1/invoke/inventory/stock")[0] == 503
    upstream = len(inventory.calls("/stock"))
    # Without a budget: 5 x 60 = 300 calls. With it: 60 + 20% + the 3-retry floor.
    assert upstream <= n + int(0.2 * n) + 3, upstream
    assert sidecar.metric("accord_sidecar_retries_denied_total", target="inventory") > 0


def test_unreachable_service_is_a_502_naming_it(spawn: Callable[..., Any]) -> None:
    sidecar: Sidecar = spawn(
        Sidecar,
        "caller",
        ACCORD_SERVICES="gone=127.0.0.1:1",
        ACCORD_RETRY_MAX_ATTEMPTS="2",
        ACCORD_RETRY_INITIAL_MS="1",
    )
    status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/gone/x")
    assert (
        status == 502
        and body["error"]["code"] == "unreachable"
        and "gone" in body["error"]["message"]
    )


def test_unknown_service_outside_a_cluster_is_a_404(spawn: Callable[..., Any]) -> None:
    sidecar: Sidecar = spawn(Sidecar, "caller")
    status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/nowhere/x")
    assert status == 404 and body["error"]["code"] == "unknown_service"
    status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/Not_A_Name/x")
    assert status == 400 and body["error"]["code"] == "invalid_service"


def test_policy_per_target_overrides_the_defaults(spawn: Callable[..., Any]) -> None:
    inventory: Recorder = spawn(Recorder, "inventory")
    payment: Recorder = spawn(Recorder, "payment")
    for r in (inventory, payment):
        r.behave({"path": "/x", "status": 503})
    sidecar: Sidecar = spawn(
        Sidecar,
        "caller",
        ACCORD_SERVICES=f"inventory=127.0.0.1:{inventory.port},payment=127.0.0.1:{payment.port}",
        ACCORD_RETRY_MAX_ATTEMPTS="3",
        ACCORD_RETRY_INITIAL_MS="1",
        ACCORD_TARGETS='{"payment": {"maxAttempts": 1}}',
    )
    request("GET", f"{sidecar.api}/v1/invoke/inventory/x")
    request("GET", f"{sidecar.api}/v1/invoke/payment/x")
    assert len(inventory.calls("/x")) == 3 and len(payment.calls("/x")) == 1
