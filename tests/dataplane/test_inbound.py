"""The inbound participant port: authentication, dedup replay, restart safety."""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster
from tests.support.dataplane import Recorder, Sidecar, request

TOKEN = "s3cret-shared-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _sidecar(spawn: Callable[..., Any], app: Recorder, **env: str) -> Sidecar:
    sidecar: Sidecar = spawn(
        Sidecar, "inventory", ACCORD_APP_PORT=str(app.port), ACCORD_SHARED_TOKEN=TOKEN, **env
    )
    return sidecar


def test_unauthenticated_calls_are_refused(spawn: Callable[..., Any]) -> None:
    app: Recorder = spawn(Recorder, "inventory-app")
    sidecar = _sidecar(spawn, app)
    status, body, _ = request("POST", f"{sidecar.inbound}/reserve", {"sku": 1})
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    status, _, _ = request(
        "POST", f"{sidecar.inbound}/reserve", {"sku": 1}, headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401
    assert app.calls() == []
    status, body, _ = request("POST", f"{sidecar.inbound}/reserve?x=1", {"sku": 1}, headers=AUTH)
    assert status == 200 and body["path"] == "/reserve"
    (call,) = app.calls()
    assert call["query"] == "x=1" and "Authorization" not in call["headers"]


def test_no_authentication_configured_refuses_everything(spawn: Callable[..., Any]) -> None:
    app: Recorder = spawn(Recorder, "inventory-app")
    sidecar: Sidecar = spawn(Sidecar, "inventory", ACCORD_APP_PORT=str(app.port))
    status, body, _ = request("POST", f"{sidecar.inbound}/reserve", {}, headers=AUTH)
    assert status == 401 and "not configured" in body["error"]["message"]


def test_completed_call_is_replayed_for_the_same_key(spawn: Callable[..., Any]) -> None:
    app: Recorder = spawn(Recorder, "inventory-app")
    sidecar = _sidecar(spawn, app)
    headers = {**AUTH, "Accord-Idempotency-Key": "saga-1/reserve/action"}
    first = request("POST", f"{sidecar.inbound}/reserve", {"sku": 1}, headers=headers)
    second = request("POST", f"{sidecar.inbound}/reserve", {"sku": 1}, headers=headers)
    assert first[0] == second[0] == 200 and first[1] == second[1]
    assert second[2].get("Accord-Replayed") == "true" and "Accord-Replayed" not in first[2]
    assert len(app.calls("/reserve")) == 1
    request(
        "POST",
        f"{sidecar.inbound}/reserve",
        {"sku": 1},
        headers={**AUTH, "Accord-Idempotency-Key": "saga-2/reserve/action"},
    )
    assert len(app.calls("/reserve")) == 2


def test_concurrent_duplicate_waits_for_the_first(spawn: Callable[..., Any]) -> None:
    app: Recorder = spawn(Recorder, "inventory-app")
    app.behave({"path": "/reserve", "delayMs": 800})
    sidecar = _sidecar(spawn, app)
    headers = {**AUTH, "Accord-Idempotency-Key": "k-concurrent"}
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                request("POST", f"{sidecar.inbound}/reserve", {}, headers=headers)
            )
        )
        for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(app.calls("/reserve")) == 1
    assert {json.dumps(r[1], sort_keys=True) for r in results} == {
        json.dumps(results[0][1], sort_keys=True)
    }
    assert sum(r[2].get("Accord-Replayed") == "true" for r in results) == 4


def test_server_errors_are_not_replayed(spawn: Callable[..., Any]) -> None:
    app: Recorder = spawn(Recorder, "inventory-app")
    app.behave({"path": "/reserve", "fail": 1, "status": 503})
    sidecar = _sidecar(spawn, app)
    headers = {**AUTH, "Accord-Idempotency-Key": "k-retry"}
    assert request("POST", f"{sidecar.inbound}/reserve", {}, headers=headers)[0] == 503
    assert request("POST", f"{sidecar.inbound}/reserve", {}, headers=headers)[0] == 200
    assert (
        request("POST", f"{sidecar.inbound}/reserve", {}, headers=headers)[2].get("Accord-Replayed")
        == "true"
    )
    assert len(app.calls("/reserve")) == 2


def test_dedup_table_survives_a_sidecar_restart(spawn: Callable[..., Any], tmp_path: Path) -> None:
    app: Recorder = spawn(Recorder, "inventory-app")
    sidecar = _sidecar(spawn, app, ACCORD_DATA_DIR=str(tmp_path / "data"))
    headers = {**AUTH, "Accord-Idempotency-Key": "k-durable"}
    first = request("POST", f"{sidecar.inbound}/reserve", {"sku": 9}, headers=headers)
    sidecar.kill()  # SIGKILL: no shutdown hook writes anything
    sidecar.start()
    again = request("POST", f"{sidecar.inbound}/reserve", {"sku": 9}, headers=headers)
    assert again[1] == first[1] and again[2].get("Accord-Replayed") == "true"
    assert len(app.calls("/reserve")) == 1


def test_a_late_action_after_its_compensation_never_reaches_the_app(
    spawn: Callable[..., Any], tmp_path: Path
) -> None:
    """The anti-suspension fence: the operator gave up on an action (timeout), compensated
    (nothing to undo yet), and then the action arrives. It must not land after the undo."""
    app: Recorder = spawn(Recorder, "payment-app")
    sidecar = _sidecar(spawn, app, ACCORD_DATA_DIR=str(tmp_path / "data"))
    undo = {**AUTH, "Accord-Idempotency-Key": "uid-7/charge/compensation"}
    late = {**AUTH, "Accord-Idempotency-Key": "uid-7/charge/action"}
    assert request("POST", f"{sidecar.inbound}/refund", {}, headers=undo)[0] == 200
    status, body, _ = request("POST", f"{sidecar.inbound}/charge", {}, headers=late)
    assert status == 410 and body["error"]["code"] == "compensated"
    assert app.calls("/charge") == []  # never passed to the app
    assert sidecar.metric("accord_sidecar_fenced_total") == 1
    # The fence is durable: a SIGKILLed sidecar still refuses it after its restart.
    sidecar.kill()
    sidecar.start()
    assert request("POST", f"{sidecar.inbound}/charge", {}, headers=late)[0] == 410
    assert app.calls("/charge") == []
    # Other steps, and a redriven generation of the same step, are not fenced.
    other = {**AUTH, "Accord-Idempotency-Key": "uid-7/ship/action"}
    redriven = {**AUTH, "Accord-Idempotency-Key": "uid-7/charge/action/r1"}
    assert request("POST", f"{sidecar.inbound}/ship", {}, headers=other)[0] == 200
    assert request("POST", f"{sidecar.inbound}/charge", {}, headers=redriven)[0] == 200


def test_a_compensation_waits_for_its_action_still_at_the_app(
    spawn: Callable[..., Any],
) -> None:
    app: Recorder = spawn(Recorder, "payment-app")
    app.behave({"path": "/charge", "delayMs": 1500})
    sidecar = _sidecar(spawn, app)
    action = {**AUTH, "Accord-Idempotency-Key": "uid-8/charge/action"}
    undo = {**AUTH, "Accord-Idempotency-Key": "uid-8/charge/compensation"}
    charged: list[Any] = []
    t = threading.Thread(
        target=lambda: charged.append(
            request("POST", f"{sidecar.inbound}/charge", {}, headers=action)
        )
    )
    t.start()
    while not app.calls("/charge"):  # the action is at the app
        threading.Event().wait(0.02)
    assert request("POST", f"{sidecar.inbound}/refund", {}, headers=undo)[0] == 200
    t.join()
    assert charged[0][0] == 200
    (refund,) = app.calls("/refund")
    assert refund["concurrent"] == 0  # it reached the app only after the charge had finished


def _token_review_sidecar(
    spawn: Callable[..., Any], cluster: Cluster, **env: str
) -> tuple[Recorder, Sidecar]:
    """An app behind a sidecar that checks callers with TokenReview on the real API server."""
    assert cluster.cp.dir is not None
    app: Recorder = spawn(Recorder, "inventory-app")
    sidecar: Sidecar = spawn(
        Sidecar,
        "inventory",
        ACCORD_APP_PORT=str(app.port),
        ACCORD_KUBE_API_URL=cluster.cp.server,
        ACCORD_KUBE_CA_FILE=str(cluster.cp.dir / "pki" / "ca.crt"),
        **env,
    )
    return app, sidecar


@pytest.mark.integration
def test_service_account_tokens_are_checked_with_token_review(
    spawn: Callable[..., Any], cluster: Cluster, namespace: str
) -> None:
    """The same sidecar, authenticating callers with TokenReview on the real API server:
    only tokens for the participant audience, never a token good for the API server."""
    for sa in ("saga-operator", "stranger"):
        cluster.kubectl("create", "serviceaccount", sa, "-n", namespace)

    def token(sa: str, *audience: str) -> str:
        return cluster.kubectl("create", "token", sa, "-n", namespace, *audience).strip()

    good = token("saga-operator", "--audience=accord.dev/participant")
    other = token("stranger", "--audience=accord.dev/participant")
    api_token = token("saga-operator")  # the API server's audience
    assert cluster.cp.dir is not None
    pki = cluster.cp.dir / "pki"
    app, sidecar = _token_review_sidecar(
        spawn,
        cluster,
        ACCORD_KUBE_CLIENT_CERT=str(pki / "admin.crt"),
        ACCORD_KUBE_CLIENT_KEY=str(pki / "admin.key"),
        ACCORD_ALLOWED_SERVICE_ACCOUNTS=f"{namespace}/saga-operator",
    )
    assert (
        request(
            "POST", f"{sidecar.inbound}/reserve", {}, headers={"Authorization": f"Bearer {good}"}
        )[0]
        == 200
    )
    status, body, _ = request(
        "POST", f"{sidecar.inbound}/reserve", {}, headers={"Authorization": f"Bearer {other}"}
    )
    assert (
        status == 403 and f"system:serviceaccount:{namespace}:stranger" in body["error"]["message"]
    )
    assert (
        request(
            "POST",
            f"{sidecar.inbound}/reserve",
            {},
            headers={"Authorization": "Bearer not-a-token"},
        )[0]
        == 401
    )
    # The operator's own API token is refused: it is for another audience.
    status, body, _ = request(
        "POST", f"{sidecar.inbound}/reserve", {}, headers={"Authorization": f"Bearer {api_token}"}
    )
    assert status == 401 and "accord.dev/participant" in body["error"]["message"]
    # And the API server refuses the participant token: it is good for nothing there.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    api_call = urllib.request.Request(
        f"{cluster.cp.server}/api/v1/namespaces", headers={"Authorization": f"Bearer {good}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(api_call, context=ctx, timeout=10)
    assert refused.value.code == 401
    assert len(app.calls("/reserve")) == 1


@pytest.mark.integration
def test_a_sidecar_without_the_tokenreview_grant_says_which_grant(
    spawn: Callable[..., Any], cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Not a bare 503: the caller (the operator's saga status) reads what is missing."""
    for sa in ("caller", "participant"):
        cluster.kubectl("create", "serviceaccount", sa, "-n", namespace)
    caller = cluster.kubectl(
        "create", "token", "caller", "-n", namespace, "--audience=accord.dev/participant"
    ).strip()
    # The participant's own credentials: a service account with no grant at all.
    token_file = tmp_path / "sa-token"
    token_file.write_text(cluster.kubectl("create", "token", "participant", "-n", namespace))
    app, sidecar = _token_review_sidecar(spawn, cluster, ACCORD_KUBE_TOKEN_FILE=str(token_file))
    status, body, _ = request(
        "POST", f"{sidecar.inbound}/reserve", {}, headers={"Authorization": f"Bearer {caller}"}
    )
    assert status == 503 and "system:auth-delegator" in body["error"]["message"]
    assert app.calls("/reserve") == []
