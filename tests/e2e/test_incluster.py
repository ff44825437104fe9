"""Accord in a real cluster: the chart installed with Accord's own images, controller and
webhook as pods under their own service accounts, participants as Deployments whose pods
get the native sidecar, sagas that drive them, and what happens to all of it when pods die,
the webhook is down, the chart is upgraded and uninstalled.

The scenarios run in file order on each provider (tests/e2e/conftest.py): the last ones
upgrade and uninstall the release.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from accord_operator.envtest.incluster import (
    CHART,
    RELEASE,
    RESTRICTED,
    injected_namespace,
    install_chart,
    ledger,
    participant,
    transaction_reader_binding,
)
from accord_operator.envtest.incluster import (
    SHOP_ROLES as ROLES,
)
from accord_operator.envtest.incluster import (
    SYSTEM_NAMESPACE as SYSTEM,
)
from accord_operator.permissions import CONTROLLER, CONTROLLER_NOT_SEEN, WEBHOOK, rules_to_grants
from tests.e2e.providers import E2ECluster
from tests.support.cluster import EXAMPLES

SHOP = "shop"


def participants(k8s: E2ECluster, namespace: str, *roles: str) -> None:
    docs = [d for role in roles for d in participant(k8s.images["samples"], role)]
    k8s.apply(*docs, namespace=namespace)


def wait_available(k8s: E2ECluster, namespace: str, timeout: int = 180) -> None:
    k8s.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment", "--all",
        f"--timeout={timeout}s",
    )  # fmt: skip


@pytest.fixture(scope="session")
def accord(k8s: E2ECluster) -> E2ECluster:
    """The chart installed, and the shop's participants running behind their sidecars."""
    install_chart(k8s.kubeconfig, k8s.images)
    k8s.apply(*injected_namespace(SHOP))
    participants(k8s, SHOP, *ROLES)
    wait_available(k8s, SHOP)
    return k8s


def saga_phase(k8s: E2ECluster, namespace: str, name: str) -> str:
    saga = k8s.get("saga", name, "-n", namespace)
    return str((saga.get("status") or {}).get("phase", ""))


def wait_saga(k8s: E2ECluster, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        saga: dict[str, Any] = k8s.get("saga", name, "-n", namespace)
        phase = (saga.get("status") or {}).get("phase", "")
        return saga if phase in ("Succeeded", "Compensated", "Failed") else None

    result: dict[str, Any] = k8s.wait_until(f"saga {name} finished", done, timeout)
    return result


def run_pod(
    k8s: E2ECluster, namespace: str, name: str, code: str, env: dict[str, str] | None = None
) -> str:
    """Run a Python one-liner in a pod of the samples image; its logs."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"accord.dev/inject": "false"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "run",
                    "image": k8s.images["samples"],
                    "imagePullPolicy": "Never",
                    "args": ["-c", code],
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                    "securityContext": RESTRICTED,
                }
            ],
        },
    }
    k8s.apply(pod, namespace=namespace)
    k8s.wait_until(
        f"pod {name} finished",
        lambda: (
            k8s.get("pod", name, "-n", namespace)["status"].get("phase") in ("Succeeded", "Failed")
        ),
    )
    return k8s.kubectl("logs", name, "-n", namespace)


def test_controller_and_webhook_run_as_pods_under_their_own_service_accounts(
    accord: E2ECluster,
) -> None:
    pods = accord.get("pods", "-n", SYSTEM)["items"]
    by_component = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in pods}
    assert set(by_component) == {"controller", "webhook", "broker"}  # broker: nats.deploy
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert all(c["ready"] for c in pod["status"]["containerStatuses"])
    webhook = accord.get("mutatingwebhookconfiguration", f"{RELEASE}-sidecar-injector")
    assert all(h["clientConfig"].get("caBundle") for h in webhook["webhooks"])


def test_participants_get_the_native_sidecar(accord: E2ECluster) -> None:
    for role in ROLES:
        pod = accord.get("pods", "-n", SHOP, "-l", f"app={role}")["items"][0]
        sidecar = pod["spec"]["initContainers"][0]
        assert sidecar["name"] == "accord-sidecar"
        assert sidecar["restartPolicy"] == "Always"  # native sidecar
        assert sidecar["image"] == accord.images["sidecar"]
        statuses = pod["status"]["initContainerStatuses"] + pod["status"]["containerStatuses"]
        assert all(s["ready"] for s in statuses), statuses


def test_sagas_drive_participants_through_their_sidecars(accord: E2ECluster) -> None:
    for name in ("saga-order.yaml", "saga-order-fails-at-payment.yaml"):
        accord.kubectl("apply", "-n", SHOP, "-f", str(EXAMPLES / name))
    assert saga_phase_eventually(accord, "order-1001") == "Succeeded"
    assert saga_phase_eventually(accord, "order-1002") == "Compensated"
    # Each call went operator -> participant sidecar (TokenReview) -> app, in order.
    inventory = accord.kubectl("logs", "-n", SHOP, "deploy/inventory", "-c", "inventory")
    assert "/reserve -> 200" in inventory and "/release -> 200" in inventory
    payment = accord.kubectl("logs", "-n", SHOP, "deploy/payment", "-c", "payment")
    assert "/charge -> 402" in payment
    # With ttlSecondsAfterFinished the controller deletes it once it has finished.
    saga = yaml.safe_load((EXAMPLES / "saga-order.yaml").read_text())
    saga["metadata"] = {"name": "order-ttl", "namespace": SHOP}
    saga["spec"]["ttlSecondsAfterFinished"] = 0
    accord.kubectl("create", "-f", "-", input=json.dumps(saga))
    accord.wait_until(
        "the finished saga deleted",
        lambda: "NotFound" in accord.kubectl(
            "get", "saga", "order-ttl", "-n", SHOP, check=False, stderr=True
        ),
    )  # fmt: skip


def test_a_refused_step_redriven_after_the_fix_runs_again_through_the_sidecar(
    accord: E2ECluster,
) -> None:
    """Payment sits behind its sidecar, which (like the app) replays the answer it stored
    for a key. A redrive after a refusal must reach the app again, under a new key."""
    saga = yaml.safe_load((EXAMPLES / "saga-order-fails-at-payment.yaml").read_text())
    saga["metadata"] = {"name": "order-redrive", "namespace": SHOP}
    steps = saga["spec"]["steps"]
    steps[0]["compensable"] = False  # the reservation is the pivot: after it, only forward
    steps[0].pop("compensation")
    accord.kubectl("create", "-f", "-", input=json.dumps(saga))
    failed = wait_saga(accord, SHOP, "order-redrive")
    assert failed["status"]["phase"] == "Failed", failed["status"]
    # The fix: payment raises the customer's limit (from inside its pod), then a redrive.
    accord.kubectl(
        "exec", "-n", SHOP, "deploy/payment", "-c", "payment", "--", "python", "-c",
        "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8080/_limit',"
        " data=b'{\"declineAboveCents\": 1000000}', method='POST'))",
    )  # fmt: skip
    accord.kubectl("annotate", "saga", "order-redrive", "-n", SHOP, "accord.dev/redrive=limit")
    accord.wait_until(
        "the redriven saga succeeded",
        lambda: (
            (accord.get("saga", "order-redrive", "-n", SHOP).get("status") or {}).get("phase")
            == "Succeeded"
        ),
    )
    status = accord.get("saga", "order-redrive", "-n", SHOP)["status"]
    assert status["steps"][1]["keyGeneration"] == 1 and "402" in status["cause"]
    charges = [
        line for line in accord.kubectl("logs", "-n", SHOP, "deploy/payment", "-c", "payment")
        .splitlines() if "/charge ->" in line
    ]  # fmt: skip
    assert [c.split(" -> ")[1][:3] for c in charges][-2:] == ["402", "200"], charges


def saga_phase_eventually(k8s: E2ECluster, name: str) -> str:
    return str(wait_saga(k8s, SHOP, name)["status"]["phase"])


CALL_PAYMENT = """
import os, urllib.request, urllib.error
for name in ("NONE", "API_TOKEN", "PARTICIPANT_TOKEN"):
    headers = {"Authorization": "Bearer " + os.environ[name]} if name != "NONE" else {}
    request = urllib.request.Request(
        "http://payment.shop.svc:3501/charge", data=b'{"input": {"orderId": "t"}}',
        headers={"Content-Type": "application/json", **headers})
    try:
        urllib.request.urlopen(request, timeout=10)
        print(name, 200)
    except urllib.error.HTTPError as e:
        print(name, e.code)
"""


def test_participants_accept_only_the_participant_audience_token(accord: E2ECluster) -> None:
    controller = f"{RELEASE}-controller"
    api_token = accord.kubectl("create", "token", controller, "-n", SYSTEM).strip()
    participant_token = accord.kubectl(
        "create", "token", controller, "-n", SYSTEM, "--audience=accord.dev/participant"
    ).strip()
    out = run_pod(
        accord, SHOP, "call-payment", CALL_PAYMENT,
        {"NONE": "", "API_TOKEN": api_token, "PARTICIPANT_TOKEN": participant_token},
    )  # fmt: skip
    # The operator's own API token is refused by the participant's sidecar...
    assert out.split("\n")[:3] == ["NONE 401", "API_TOKEN 401", "PARTICIPANT_TOKEN 200"]
    # ...and the token participants receive is refused by the API server.
    assert accord.api_status(f"/api/v1/namespaces/{SHOP}/pods", participant_token) == 401
    # (while the API token, the one participants never see, can list pods everywhere)
    assert accord.api_status(f"/api/v1/namespaces/{SHOP}/pods", api_token) == 200


def test_job_steps_run_real_pods_and_feed_their_output_to_the_next_step(
    accord: E2ECluster,
) -> None:
    write = (
        "import json, os; inp = json.loads(os.environ['ACCORD_SAGA_INPUT']); "
        "out = json.loads(os.environ['ACCORD_SAGA_OUTPUTS']); "
        "open('/dev/termination-log', 'w').write(json.dumps({'label': 'L-' + inp['orderId'], "
        "'saw': out}))"
    )
    job = {"image": accord.images["samples"], "command": ["python", "-c", write]}
    saga = {
        "apiVersion": "accord.dev/v1alpha1",
        "kind": "SagaWorkflow",
        "metadata": {"name": "labels-7"},
        "spec": {
            "input": {"orderId": "7"},
            "steps": [
                {"name": "make-label", "action": {"job": job}},
                {"name": "print-label", "action": {"job": job}},
            ],
        },
    }
    accord.apply(saga, namespace=SHOP)
    done = wait_saga(accord, SHOP, "labels-7", timeout=180)
    assert done["status"]["phase"] == "Succeeded"
    steps = {s["name"]: s for s in done["status"]["steps"]}
    first = steps["make-label"]["output"]
    assert first == {"label": "L-7", "saw": {}}
    assert steps["print-label"]["output"]["saw"] == {"make-label": first}
    pods = accord.get("pods", "-n", SHOP, "-l", "accord.dev/saga=labels-7")["items"]
    assert sorted(p["status"]["phase"] for p in pods) == ["Succeeded", "Succeeded"]
    # The step pods got the sidecar too, and it did not keep them from completing.
    assert all(p["spec"]["initContainers"][0]["name"] == "accord-sidecar" for p in pods)


def test_injected_pods_run_where_pss_restricted_is_enforced(accord: E2ECluster) -> None:
    ns = "restricted-shop"
    accord.apply(*injected_namespace(ns, **{"pod-security.kubernetes.io/enforce": "restricted"}))
    participants(accord, ns, "inventory")
    wait_available(accord, ns)
    pod = accord.get("pods", "-n", ns, "-l", "app=inventory")["items"][0]
    assert pod["spec"]["initContainers"][0]["name"] == "accord-sidecar"


def test_the_operator_pod_killed_mid_saga_still_finishes_it_right(accord: E2ECluster) -> None:
    slow = {
        "image": accord.images["samples"],
        "command": ["python", "-c", "import time; time.sleep(8); print('slept')"],
    }
    saga = {
        "apiVersion": "accord.dev/v1alpha1",
        "kind": "SagaWorkflow",
        "metadata": {"name": "order-killed"},
        "spec": {
            "input": {"orderId": "31", "sku": "book-1", "quantity": 1, "amountCents": 100},
            "steps": [
                {
                    "name": "reserve-inventory",
                    "action": {"http": {"service": "inventory", "path": "/reserve"}},
                    "compensation": {"http": {"service": "inventory", "path": "/release"}},
                },
                {"name": "pack", "action": {"job": slow}},
                {"name": "ship", "action": {"http": {"service": "shipping", "path": "/ship"}}},
            ],
        },
    }
    accord.apply(saga, namespace=SHOP)
    accord.wait_until(
        "the pack step's pod running",
        lambda: accord.get("pods", "-n", SHOP, "-l", "accord.dev/saga=order-killed")["items"],
    )
    controller = accord.get("pods", "-n", SYSTEM, "-l", "app.kubernetes.io/component=controller")[
        "items"
    ][0]["metadata"]["name"]
    accord.kubectl("delete", "pod", controller, "-n", SYSTEM, "--grace-period=0", "--force")
    done = wait_saga(accord, SHOP, "order-killed", timeout=180)
    assert done["status"]["phase"] == "Succeeded"
    # The new controller adopted the step's pod: it ran once.
    pods = accord.get("pods", "-n", SHOP, "-l", "accord.dev/saga=order-killed")["items"]
    assert len(pods) == 1
    shipping = accord.kubectl("logs", "-n", SHOP, "deploy/shipping", "-c", "shipping")
    assert shipping.count('"order": "31"') == 1


def test_only_pods_that_ask_for_the_sidecar_reach_the_webhook(accord: E2ECluster) -> None:
    if accord.audit_log is None:
        pytest.skip("kind: its API server's audit log is not ours to read")
    ns = "plain"
    accord.kubectl("create", "namespace", ns)
    accord.wait_until(
        "default SA", lambda: accord.kubectl("get", "sa", "default", "-n", ns, check=False)
    )

    def pod(name: str, **annotations: str) -> dict[str, Any]:
        container = {"name": "c", "image": accord.images["samples"], "imagePullPolicy": "Never"}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{**container, "args": ["-c", "print(1)"]}]},
        }

    accord.apply(pod("not-asking"), pod("asking", **{"accord.dev/inject": "true"}), namespace=ns)
    # A pod that did not opt in never waits on the webhook, not even while it hangs: the
    # API server does not call it (matchConditions).
    assert accord.webhooks_called_for_pod(ns, "not-asking") == []
    assert accord.webhooks_called_for_pod(ns, "asking") == ["object.inject.accord.dev"]


def test_pods_created_while_the_webhook_is_down_are_reported(accord: E2ECluster) -> None:
    ns = "misses"
    accord.kubectl("create", "namespace", ns)
    webhook = f"{RELEASE}-webhook"
    replicas = accord.get("deployment", webhook, "-n", SYSTEM)["spec"]["replicas"]
    accord.kubectl("scale", "deployment", webhook, "-n", SYSTEM, "--replicas=0")
    accord.wait_until(
        "webhook pods gone",
        lambda: (
            not accord.get("pods", "-n", SYSTEM, "-l", "app.kubernetes.io/component=webhook")[
                "items"
            ]
        ),
    )
    try:
        # Asked for the sidecar by annotation: the object webhook's failurePolicy is Ignore.
        docs = participant(accord.images["samples"], "payment")
        template = docs[0]["spec"]["template"]
        template["metadata"]["annotations"]["accord.dev/inject"] = "true"
        template["spec"].pop("serviceAccountName")
        docs[0]["spec"]["replicas"] = 0
        accord.apply(docs[0], namespace=ns)
        accord.kubectl("scale", "deployment", "payment", "-n", ns, "--replicas=2")
        pods = accord.wait_until(
            "two pods created",
            lambda: (
                [p for p in accord.get("pods", "-n", ns)["items"]]
                if len(accord.get("pods", "-n", ns)["items"]) == 2
                else None
            ),
        )
        assert all(not p["spec"].get("initContainers") for p in pods)  # not injected

        def reported() -> set[str]:
            events = accord.get("events", "-n", ns, "--field-selector", "reason=SidecarMissing")
            return {e["involvedObject"]["name"] for e in events["items"]}

        names = {p["metadata"]["name"] for p in pods}
        accord.wait_until("every miss reported", lambda: reported() >= names, timeout=60)
    finally:
        accord.kubectl("scale", "deployment", webhook, "-n", SYSTEM, f"--replicas={replicas}")
        accord.kubectl("rollout", "status", "deployment", webhook, "-n", SYSTEM, "--timeout=120s")
        # Ready pods are not yet a reachable Service (endpoints, kube-proxy): later tests
        # go through the fail-closed webhooks, so wait until one answers a dry run.
        accord.wait_until(
            "the webhook Service answers",
            lambda: "created (server dry run)" in accord.kubectl(
                "create", "--dry-run=server", "-n", SHOP, "-f", str(EXAMPLES / "tpc-transfer.yaml"),
                check=False, stderr=True,
            ),
        )  # fmt: skip


BANK = "bank"


@pytest.fixture(scope="session")
def bank(accord: E2ECluster) -> E2ECluster:
    """Two ledger participants (SQLite in their pods) behind their sidecars, and the binding
    README "2PC participants" asks for, so their sidecars may read their transactions."""
    accord.apply(*injected_namespace(BANK))
    accord.apply(transaction_reader_binding(BANK))
    accord.apply(
        # ledger-a may take 20 s to vote (a test asks it to): its sidecar waits that long.
        *ledger(accord.images["samples"], "ledger-a", {"alice": 10_000},
                **{"accord.dev/timeout-ms": "40000"}),
        *ledger(accord.images["samples"], "ledger-b", {"bob": 0},
                **{"accord.dev/tpc-outcome-after-seconds": "2"}),
        namespace=BANK,
    )  # fmt: skip
    wait_available(accord, BANK)
    return accord


def transfer(name: str, cents: int, prepare_timeout_s: int = 10) -> str:
    tx = yaml.safe_load((EXAMPLES / "tpc-transfer.yaml").read_text())
    tx["metadata"] = {"name": name, "namespace": BANK}
    tx["spec"]["prepareTimeoutSeconds"] = prepare_timeout_s
    debit_p, credit_p = tx["spec"]["participants"]
    debit_p["payload"]["amountCents"], credit_p["payload"]["amountCents"] = -cents, cents
    return json.dumps(tx)


def wait_tpc(k8s: E2ECluster, name: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        tx: dict[str, Any] = k8s.get("tpc", name, "-n", BANK)
        return tx if (tx.get("status") or {}).get("phase") in ("Committed", "Aborted") else None

    result: dict[str, Any] = k8s.wait_until(f"transaction {name} finished", done, timeout)
    return result


def ledger_lines(k8s: E2ECluster, name: str, tx: str, container: str = "ledger") -> list[str]:
    logs = k8s.kubectl("logs", "-n", BANK, f"deploy/{name}", "-c", container)
    return [line for line in logs.splitlines() if f"{BANK}/{tx}" in line]


def test_transactions_commit_and_abort_across_ledger_pods(bank: E2ECluster) -> None:
    bank.kubectl("create", "-f", "-", input=transfer("t-commit", 5000))
    bank.kubectl("create", "-f", "-", input=transfer("t-overdraft", 999_999))
    committed, aborted = wait_tpc(bank, "t-commit"), wait_tpc(bank, "t-overdraft")
    assert committed["status"]["phase"] == "Committed", committed["status"]
    assert committed["status"]["decision"] == "Commit"
    assert aborted["status"]["phase"] == "Aborted" and aborted["status"]["decision"] == "Abort"
    for tx in (committed, aborted):
        assert all(p["acked"] for p in tx["status"]["participants"]), tx["status"]
        # The finalizer goes in the write after the final status (a status write cannot
        # change metadata): a moment later, not in the same read.
        name = tx["metadata"]["name"]
        bank.wait_until(
            f"{name}'s finalizer gone",
            lambda n=name: not bank.get("tpc", n, "-n", BANK)["metadata"].get("finalizers"),
            timeout=30,
        )
    # Each ledger pod saw its prepare and the decision, once each.
    assert ledger_lines(bank, "ledger-a", "t-commit") == [
        "ledger-a: prepare bank/t-commit -> vote commit",
        "ledger-a: commit bank/t-commit -> balances: alice 50.00",
    ]
    assert ledger_lines(bank, "ledger-b", "t-commit") == [
        "ledger-b: prepare bank/t-commit -> vote commit",
        "ledger-b: commit bank/t-commit -> balances: bob 50.00",
    ]
    # (The two run at once: the balance an abort prints depends on whether t-commit landed.)
    overdraft_a = ledger_lines(bank, "ledger-a", "t-overdraft")
    assert overdraft_a[0] == "ledger-a: prepare bank/t-overdraft -> vote abort", overdraft_a
    assert [line.split(" -> ")[0] for line in overdraft_a[1:]] == [
        "ledger-a: abort bank/t-overdraft"
    ]
    # ledger-a's abort vote may be back before ledger-b's prepare goes out: then ledger-b is
    # never called (it holds nothing, an abort has nothing to undo); otherwise it is told.
    overdraft_b = [line.split(" -> ")[0] for line in ledger_lines(bank, "ledger-b", "t-overdraft")]
    assert overdraft_b in (
        [],
        ["ledger-b: prepare bank/t-overdraft", "ledger-b: abort bank/t-overdraft"],
    ), overdraft_b


def behave(k8s: E2ECluster, name: str, how: dict[str, Any]) -> None:
    """Tell a ledger how to answer (its /_behave, from inside its pod)."""
    k8s.kubectl(
        "exec", "-n", BANK, f"deploy/{name}", "-c", "ledger", "--", "python", "-c",
        "import sys, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8080/_behave',"
        " data=sys.argv[1].encode(), method='POST'))", json.dumps(how),
    )  # fmt: skip


def test_a_participant_cut_off_after_its_vote_learns_the_decision_with_its_own_account(
    bank: E2ECluster,
) -> None:
    """ledger-b votes commit, then the coordinator cannot reach it (its Service selects no
    pod). Its sidecar reads the transaction with the pod's service account (the chart's
    transaction-reader role) and commits through the fence; once reachable again, the
    coordinator's own commit is answered by the fence without a second call to the app."""
    # ledger-a votes 20 s after ledger-b: by then the coordinator's keep-alive connection
    # to ledger-b (15 s idle at most) is closed, and a new one finds no pod behind the
    # Service (an open connection would outlive the Service change, as established flows do).
    behave(bank, "ledger-a", {"delayMs": 20_000})
    bank.kubectl("create", "-f", "-", input=transfer("t-cut-off", 1000, prepare_timeout_s=60))
    bank.wait_until(
        "ledger-b voted", lambda: ledger_lines(bank, "ledger-b", "t-cut-off"), timeout=60
    )
    selector = {"spec": {"selector": {"app": "ledger-b-away"}}}
    bank.kubectl("patch", "service", "ledger-b", "-n", BANK, "-p", json.dumps(selector))
    try:
        try:
            bank.wait_until(
                "ledger-b committed on its own",
                lambda: len(ledger_lines(bank, "ledger-b", "t-cut-off")) == 2,
                timeout=90,
            )
        except AssertionError as exc:
            own = bank.kubectl("logs", "-n", BANK, "deploy/ledger-b", "-c", "accord-sidecar")
            raise AssertionError(f"{exc}\nledger-b's sidecar said:\n{own[-4000:]}") from None
        tx = bank.get("tpc", "t-cut-off", "-n", BANK)
        assert tx["status"]["decision"] == "Commit" and tx["status"]["phase"] != "Committed"
    finally:
        behave(bank, "ledger-a", {})
        restore = {"spec": {"selector": {"app": "ledger-b"}}}
        bank.kubectl("patch", "service", "ledger-b", "-n", BANK, "-p", json.dumps(restore))
    assert wait_tpc(bank, "t-cut-off")["status"]["phase"] == "Committed"
    assert ledger_lines(bank, "ledger-b", "t-cut-off") == [
        "ledger-b: prepare bank/t-cut-off -> vote commit",
        "ledger-b: commit bank/t-cut-off -> balances: bob 60.00",
    ]
    own = ledger_lines(bank, "ledger-b", "t-cut-off", container="accord-sidecar")
    assert any("no word from the coordinator" in line for line in own), own


READS = "reads"
PUBLISH = """
import json, os, time, urllib.request, urllib.error
n, first = int(os.environ["N"]), int(os.environ.get("FIRST", "0"))
topic, keys = os.environ.get("TOPIC", "orders.events"), int(os.environ.get("KEYS", "5"))
for i in range(first, n):
    time.sleep(float(os.environ.get("PAUSE", "0")))
    event = {"id": f"o-{i}", "customer": f"c{i % keys}", "amountCents": 100 + i}
    headers = {"Content-Type": "application/json", "Accord-Idempotency-Key": event["id"]}
    if os.environ.get("KEYED"):
        headers["Accord-Partition-Key"] = event["customer"]
    while True:  # until the sidecar (and its broker) take it; the same id: stored once
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:3500/v1/publish/{topic}", data=json.dumps(event).encode(),
                headers=headers)
            with urllib.request.urlopen(request, timeout=10) as r:
                last = json.load(r)["sequence"]
            break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
print("published", n, "last sequence", last)
"""


def publish(k8s: E2ECluster, namespace: str, n: int, first: int = 0, pause: float = 0,
            wait: bool = True, **env: str) -> str:  # fmt: skip
    """A pod with the sidecar injected publishes order events o-<first>..o-<n-1> through it
    (`pause` seconds before each; wait: until it is done, and its log)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"orders-api-{n}", "annotations": {"accord.dev/inject": "true"},
                     "labels": {"app": "orders-api"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "publish", "image": k8s.images["samples"], "imagePullPolicy": "Never",
                "args": ["-c", PUBLISH], "env": [{"name": "N", "value": str(n)},
                                                 {"name": "FIRST", "value": str(first)},
                                                 {"name": "PAUSE", "value": str(pause)},
                                                 *({"name": k, "value": v}
                                                   for k, v in env.items())],
                "securityContext": RESTRICTED,
            }],
        },
    }  # fmt: skip
    k8s.apply(pod, namespace=namespace)
    name: str = pod["metadata"]["name"]
    return published(k8s, namespace, name) if wait else name


def published(k8s: E2ECluster, namespace: str, name: str) -> str:
    """Wait for a publish pod to finish: its log."""
    k8s.wait_until(
        f"{name} finished",
        lambda: (
            k8s.get("pod", name, "-n", namespace)["status"].get("phase") in ("Succeeded", "Failed")
        ),
        timeout=240,
    )
    return k8s.kubectl("logs", name, "-n", namespace, "-c", "publish")


WATCH_QUERIES = """
import json, os, time, urllib.request
seen, until = [], time.time() + float(os.environ["SECONDS"])
while time.time() < until:
    try:
        with urllib.request.urlopen(os.environ["URL"], timeout=5) as r:
            model = json.load(r)
        seen.append([model["generation"], model["events"]])
        if model["generation"] == os.environ["LAST_GENERATION"] and model["events"] >= int(
                os.environ["LAST_EVENTS"]):
            break
    except Exception as exc:
        seen.append(["error", repr(exc)])
    time.sleep(0.2)
print(json.dumps(seen))
"""


def projection_status(k8s: E2ECluster) -> dict[str, Any]:
    status: dict[str, Any] = k8s.get("proj", "orders", "-n", READS).get("status") or {}
    return status


def query(k8s: E2ECluster, name: str) -> dict[str, Any]:
    """GET /orders through the projection's query Service, from a pod in the cluster."""
    code = (
        "import urllib.request, sys; "
        f"sys.stdout.write(urllib.request.urlopen('http://orders.{READS}.svc/orders').read().decode())"
    )
    out = run_pod(k8s, READS, name, code)
    model: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return model


def test_a_projection_runs_as_pods_and_its_status_tells_the_truth(accord: E2ECluster) -> None:
    """The write side publishes through its sidecar; the projection's projector runs as a
    pod with the sidecar injected and subscribed; the status comes from the broker; queries
    go through the projection's Service. Then a rebuild (blue/green) and a pause."""
    accord.kubectl("create", "namespace", READS)
    assert "published 300" in publish(accord, READS, 300)
    proj = yaml.safe_load((EXAMPLES / "projection-orders.yaml").read_text())
    proj["metadata"] = {"name": "orders", "namespace": READS}
    proj["spec"]["projector"].update(image=accord.images["samples"], imagePullPolicy="Never")
    accord.kubectl("create", "-f", "-", input=json.dumps(proj))
    live = accord.wait_until(
        "the projection Live",
        lambda: (s := projection_status(accord)).get("phase") == "Live" and s,
        timeout=180,
    )
    assert (live["lag"], live["eventsProcessed"], live["servingGeneration"]) == (0, 300, 0)
    pods = accord.get("pods", "-n", READS, "-l", "accord.dev/projection=orders")["items"]
    assert [p["spec"]["initContainers"][0]["name"] for p in pods] == ["accord-sidecar"]
    model = query(accord, "query-0")
    assert (model["generation"], model["events"]) == ("0", 300)
    assert sum(c["orders"] for c in model["customers"].values()) == 300

    # Rebuild under live traffic: generation 1 fills beside generation 0, which keeps
    # serving (and projecting the new events) until generation 1 has caught up and takes
    # over the Service. A pod queries the Service all along: never an empty or half-built
    # model, never an error.
    watcher = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "watch-queries", "annotations": {"accord.dev/inject": "false"}},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "run", "image": accord.images["samples"], "imagePullPolicy": "Never",
            "args": ["-c", WATCH_QUERIES], "securityContext": RESTRICTED,
            "env": [{"name": k, "value": v} for k, v in {
                "URL": f"http://orders.{READS}.svc/orders", "SECONDS": "200",
                "LAST_GENERATION": "1", "LAST_EVENTS": "350"}.items()],
        }]},
    }  # fmt: skip
    accord.apply(watcher, namespace=READS)
    accord.wait_until("the watcher queries",
                      lambda: accord.get("pod", "watch-queries", "-n", READS)["status"].get(
                          "phase") in ("Running", "Succeeded"))  # fmt: skip
    traffic = publish(accord, READS, 350, first=300, pause=0.1, wait=False)
    accord.kubectl("patch", "proj", "orders", "-n", READS, "--type=merge",
                   "-p", '{"spec": {"rebuildGeneration": 1}}')  # fmt: skip
    assert "published 350" in published(accord, READS, traffic)
    accord.wait_until(
        "generation 1 serves, all 350 projected",
        lambda: (
            (s := projection_status(accord)).get("phase") == "Live"
            and s.get("servingGeneration") == 1
            and s.get("eventsProcessed") == 350
        ),
        timeout=180,
    )
    accord.wait_until("the watcher done", lambda: accord.get(
        "pod", "watch-queries", "-n", READS)["status"].get("phase") == "Succeeded",
        timeout=120)  # fmt: skip
    seen = json.loads(accord.kubectl("logs", "watch-queries", "-n", READS).strip().splitlines()[-1])
    assert seen and all(g in ("0", "1") and n >= 300 for g, n in seen), seen
    assert seen[0][0] == "0" and [g for g, _ in seen] == sorted(g for g, _ in seen)  # the switch
    assert seen[-1] == ["1", 350], seen[-1]
    rebuilt = query(accord, "query-1")
    assert rebuilt["generation"] == "1" and rebuilt["events"] == 350
    assert sum(c["orders"] for c in rebuilt["customers"].values()) == 350
    accord.wait_until(
        "generation 0 removed",
        lambda: not accord.get("deployments", "-n", READS, "-l",
                               "accord.dev/projection-generation=0")["items"],
    )  # fmt: skip

    # Paused: no projector runs, the position is kept; resumed, it catches up.
    accord.kubectl("patch", "proj", "orders", "-n", READS, "--type=merge",
                   "-p", '{"spec": {"paused": true}}')  # fmt: skip
    accord.wait_until(
        "paused",
        lambda: projection_status(accord).get("message", "").startswith("paused"),
    )
    assert accord.get("deployment", "orders-g1", "-n", READS)["spec"]["replicas"] == 0
    assert "published 20" in publish(accord, READS, 20)  # ids o-0..o-19 again: duplicates
    accord.kubectl("patch", "proj", "orders", "-n", READS, "--type=merge",
                   "-p", '{"spec": {"paused": false}}')  # fmt: skip
    resumed = accord.wait_until(
        "resumed and Live",
        lambda: (s := projection_status(accord)).get("phase") == "Live" and s,
        timeout=180,
    )
    assert resumed["eventsProcessed"] == 350  # the broker dropped the re-published ids
    events = accord.kubectl("get", "events", "-n", READS, "--field-selector",
                            "involvedObject.kind=CQRSProjection", "-o", "json")  # fmt: skip
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"CatchingUp", "Live", "Rebuilding", "Switched"} <= reasons or {
        "Live",
        "Switched",
    } <= reasons


def example_projection(
    k8s: E2ECluster,
    namespace: str,
    name: str,
    source: dict[str, Any] | None = None,
    projector: dict[str, Any] | None = None,
    **spec: Any,
) -> Callable[[], dict[str, Any]]:
    """examples/projection-orders.yaml as `name` in `namespace`, on our samples image, with
    these changes; a reader of its status."""
    proj = yaml.safe_load((EXAMPLES / "projection-orders.yaml").read_text())
    proj["metadata"] = {"name": name, "namespace": namespace}
    proj["spec"]["source"].update(source or {})
    proj["spec"]["projector"].update(image=k8s.images["samples"], imagePullPolicy="Never",
                                     **(projector or {}))  # fmt: skip
    proj["spec"].update(spec)
    k8s.kubectl("create", "-f", "-", input=json.dumps(proj))

    def status() -> dict[str, Any]:
        found: dict[str, Any] = k8s.get("proj", name, "-n", namespace).get("status") or {}
        return found

    return status


def test_a_partitioned_projection_shares_its_partitions_out_among_its_pods(
    accord: E2ECluster,
) -> None:
    """partitions 2, replicas 2: two projector pods, each sidecar delivering one partition
    (claims on the broker), together every event once; the status covers both."""
    status = example_projection(accord, READS, "split", partitions=2, replicas=2)

    # Live may come before the second pod is ready (the first pod up takes every partition
    # until the second joins): wait for both.
    live = accord.wait_until(
        "the partitioned projection Live on both pods",
        lambda: (s := status()).get("phase") == "Live" and s.get("readyReplicas") == 2 and s,
        timeout=180,
    )
    assert (live["lag"], live["eventsProcessed"]) == (0, 350)
    pods = accord.get("pods", "-n", READS, "-l", "accord.dev/projection=split")["items"]
    assert len(pods) == 2

    def sidecar_log(pod: dict[str, Any]) -> str:
        return accord.kubectl("logs", "-n", READS, pod["metadata"]["name"], "-c", "accord-sidecar")

    # The first pod up may have projected the backlog alone; once both share the
    # partitions, new events go to each by partition.
    accord.wait_until(
        "each pod owns a partition",
        lambda: all("2 replica(s); this one takes partitions" in sidecar_log(p) for p in pods),
    )
    assert "published 370" in publish(accord, READS, 370, first=350)  # o-350..o-369: new
    accord.wait_until("370 projected", lambda: status().get("eventsProcessed") == 370)
    code = (
        "import urllib.request, sys; "
        "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8080/orders').read().decode())"
    )
    counts = []
    for pod in pods:
        name = pod["metadata"]["name"]
        out = accord.kubectl("exec", "-n", READS, name, "-c", "projector", "--",
                             "python", "-c", code)  # fmt: skip
        counts.append(json.loads(out.strip().splitlines()[-1])["events"])
    assert all(counts) and sum(counts) == 370, counts  # each its partition, each event once
    # Projector containers start after their sidecars: no event paid for that wait.
    assert status().get("deadLettered", 0) == 0, status()


BULK = "bulk"
PUBLISH_BATCHES = """
import json, os, urllib.request, urllib.error, time
n, size = int(os.environ["N"]), 500
for start in range(0, n, size):
    time.sleep(float(os.environ.get("PAUSE", "0")))
    events = [{"specversion": "1.0", "id": f"o-{i}", "source": "/orders", "type": "placed",
               "data": {"customer": f"c{i % 5}", "amountCents": 100 + i}}
              for i in range(start, min(n, start + size))]
    while True:
        try:
            request = urllib.request.Request(
                "http://127.0.0.1:3500/v1/publish/bulk.events", data=json.dumps(events).encode(),
                headers={"Content-Type": "application/cloudevents-batch+json"})
            urllib.request.urlopen(request, timeout=30).read()
            break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
print("published", n)
"""


def projector_state(k8s: E2ECluster, namespace: str, name: str) -> str:
    """For a failure's message: the projection's status and its sidecars' last log lines."""
    out = [json.dumps(k8s.get("proj", name, "-n", namespace).get("status") or {}, indent=1)]
    for pod in k8s.get("pods", "-n", namespace, "-l", f"accord.dev/projection={name}")["items"]:
        for container in ("accord-sidecar", "projector"):
            logs = k8s.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "-c", container,
                               check=False)  # fmt: skip
            out.append(f"--- {pod['metadata']['name']} {container}:\n" + logs[-3000:])
    return "\n".join(out)


def wait_projected(k8s: E2ECluster, namespace: str, name: str, events: int, timeout: float) -> None:
    """Until the projection is Live with `events` projected; on failure, what its status and
    its pods' logs say."""

    def done() -> bool:
        status = k8s.get("proj", name, "-n", namespace).get("status") or {}
        return bool(status.get("phase") == "Live" and status.get("eventsProcessed") == events)

    try:
        k8s.wait_until(f"all {events} projected", done, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{projector_state(k8s, namespace, name)}") from None


def sigkill_process(cmd: str, env: str) -> int:
    """SIGKILL, from this host, the process of a pod's container: its command line has
    `cmd`, its environment `env` (the kubelet restarts the container; nothing in it gets
    to clean up)."""
    import os
    import signal
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd.encode() in cmdline and env.encode() in environ:
            os.kill(int(proc.name), signal.SIGKILL)
            return int(proc.name)
    raise AssertionError(f"no process {cmd!r} with {env!r}")


def test_ten_thousand_events_survive_the_sidecar_and_the_projector_sigkilled(
    accord: E2ECluster,
) -> None:
    """10,000 events into a projection with batches of 100; mid-stream the sidecar's
    process and then the projector's are SIGKILLed (the kubelet restarts each container,
    the projector's read model is on its emptyDir): the read model ends exact, each event
    counted once."""
    accord.kubectl("create", "namespace", BULK)
    status = example_projection(accord, BULK, "tenk", source={"topic": "bulk.events"})

    accord.wait_until("the projector ready", lambda: status().get("readyReplicas") == 1,
                      timeout=120)  # fmt: skip
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bulk-api", "annotations": {"accord.dev/inject": "true"}},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "publish", "image": accord.images["samples"], "imagePullPolicy": "Never",
            "args": ["-c", PUBLISH_BATCHES], "env": [{"name": "N", "value": "10000"},
                                                     {"name": "PAUSE", "value": "0.5"}],
            "securityContext": RESTRICTED}]},
    }  # fmt: skip
    accord.apply(pod, namespace=BULK)
    accord.wait_until("some projected", lambda: status().get("eventsProcessed", 0) > 1000,
                      timeout=120, every=0.2)  # fmt: skip
    sigkill_process("accord_sidecar", "ACCORD_APP_ID=tenk-g0")
    accord.wait_until("more projected", lambda: status().get("eventsProcessed", 0) > 5000,
                      timeout=120, every=0.2)  # fmt: skip
    sigkill_process("projector.py", "ACCORD_PROJECTION_NAME=tenk")
    assert "published 10000" in published(accord, BULK, "bulk-api")
    wait_projected(accord, BULK, "tenk", 10_000, timeout=240)

    def restarted() -> dict[str, Any] | None:
        (pod,) = accord.get("pods", "-n", BULK, "-l", "accord.dev/projection=tenk")["items"]
        counts = {
            c["name"]: c["restartCount"]
            for c in (pod["status"]["containerStatuses"] + pod["status"]["initContainerStatuses"])
        }
        return pod if counts["accord-sidecar"] >= 1 and counts["projector"] >= 1 else None

    projector = accord.wait_until("both containers restarted once", restarted)
    code = (
        "import urllib.request, sys; "
        "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8080/orders').read().decode())"
    )

    def model_now() -> dict[str, Any] | None:  # the restarted projector may still be starting
        try:
            out = accord.kubectl("exec", "-n", BULK, projector["metadata"]["name"],
                                 "-c", "projector", "--", "python", "-c", code)  # fmt: skip
        except Exception:
            return None
        found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return found

    model = accord.wait_until("the projector answers", model_now)
    assert model["events"] == 10_000
    assert sum(c["orders"] for c in model["customers"].values()) == 10_000
    assert sum(c["amountCents"] for c in model["customers"].values()) == sum(
        100 + i for i in range(10_000)
    )


POISON = "poison"


def test_a_poison_event_parks_only_its_key_until_annotated_retry(accord: E2ECluster) -> None:
    """The projector refuses o-3 (customer c3): after maxDeliveries it is dead-lettered and
    c3 parked, so o-8 and o-13 (c3 too) wait while the other customers go on; the status
    counts them. Fixed, `accord.dev/parked=retry` delivers them, in order."""
    accord.kubectl("create", "namespace", POISON)
    status = example_projection(accord, POISON, "picky",
                                source={"topic": "poison.events", "maxDeliveries": 2})  # fmt: skip

    accord.wait_until("the projector ready", lambda: status().get("readyReplicas") == 1,
                      timeout=120)  # fmt: skip
    (pod,) = accord.get("pods", "-n", POISON, "-l", "accord.dev/projection=picky")["items"]

    def projector(code: str) -> str:
        return accord.kubectl("exec", "-n", POISON, pod["metadata"]["name"], "-c", "projector",
                              "--", "python", "-c", code)  # fmt: skip

    behave = (
        "import sys, urllib.request as u; u.urlopen(u.Request("
        "'http://127.0.0.1:8080/_behave', data=sys.argv[1].encode(), method='POST'))"
    )
    projector(behave.replace("sys.argv[1]", repr(json.dumps({"failIds": ["o-3"]}))))
    assert "published 15" in publish(accord, POISON, 15, TOPIC="poison.events", KEYED="1")
    parked = accord.wait_until("c3 parked",
                               lambda: (s := status()).get("parkedKeys") == 1
                               and s.get("parkedEvents") == 3 and s, timeout=120)  # fmt: skip
    assert parked["deadLettered"] == 1 and "parked" in parked["message"]
    read = (
        "import sys, urllib.request; "
        "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8080/orders').read().decode())"
    )
    model = json.loads(projector(read).strip().splitlines()[-1])
    assert model["events"] == 12 and "c3" not in model["customers"]  # the others went on

    projector(behave.replace("sys.argv[1]", repr("{}")))  # fixed
    accord.kubectl("annotate", "proj", "picky", "-n", POISON, "accord.dev/parked=retry")
    accord.wait_until("unparked", lambda: status().get("parkedKeys") == 0
                      and "accord.dev/parked" not in (accord.get("proj", "picky", "-n", POISON)[
                          "metadata"].get("annotations") or {}), timeout=120)  # fmt: skip
    model = json.loads(projector(read).strip().splitlines()[-1])
    assert model["events"] == 15 and model["customers"]["c3"]["orders"] == 3
    logs = accord.kubectl("logs", "-n", POISON, pod["metadata"]["name"], "-c", "accord-sidecar")
    assert "parked with its key 'c3'" in logs and "delivered and unparked" in logs


SCALE = "scale"


def test_partitions_keep_order_per_key_while_projector_pods_scale_and_one_is_lost(
    accord: E2ECluster,
) -> None:
    """4 partitions; the projector's replicas go 1 -> 4 (one pod then force-deleted) -> 2
    while keyed events flow. Every projector forwards what it applies to one log (a
    recorder): each key's events in order (a replay after a handover may go back, never
    skip ahead), none lost."""
    accord.kubectl("create", "namespace", SCALE)
    log = {"app": "applied-log"}
    accord.apply(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "applied-log"},
         "spec": {"selector": {"matchLabels": log}, "template": {"metadata": {"labels": log},
                  "spec": {"containers": [{
                      "name": "log", "image": accord.images["samples"],
                      "imagePullPolicy": "Never", "securityContext": RESTRICTED,
                      "args": ["recorder.py", "--port", "8080", "--host", "0.0.0.0"]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "applied-log"},
         "spec": {"selector": log, "ports": [{"port": 80, "targetPort": 8080}]}},
        namespace=SCALE,
    )  # fmt: skip
    status = example_projection(
        accord, SCALE, "scaled", source={"topic": "scale.events"}, partitions=4, replicas=1,
        projector={"batchSize": 10, "args": [
            "projector.py", "--port", "8080", "--data", "/data",
            "--forward", f"http://applied-log.{SCALE}.svc/applied"]},
    )  # fmt: skip

    def scale(replicas: int) -> None:
        accord.kubectl("patch", "proj", "scaled", "-n", SCALE, "--type=merge",
                       "-p", json.dumps({"spec": {"replicas": replicas}}))  # fmt: skip
        accord.wait_until(
            f"{replicas} projector pods ready",
            lambda: status().get("readyReplicas") == replicas,
            timeout=120,
        )

    accord.wait_until("a projector ready", lambda: status().get("readyReplicas") == 1,
                      timeout=120)  # fmt: skip
    traffic = publish(accord, SCALE, 600, pause=0.05, wait=False,
                      TOPIC="scale.events", KEYED="1", KEYS="12")  # fmt: skip
    time.sleep(5)
    scale(4)
    time.sleep(5)
    pods = accord.get("pods", "-n", SCALE, "-l", "accord.dev/projection=scaled")["items"]
    accord.kubectl("delete", "pod", "-n", SCALE, pods[0]["metadata"]["name"],
                   "--grace-period=0", "--force")  # fmt: skip
    time.sleep(5)
    scale(2)
    assert "published 600" in published(accord, SCALE, traffic)
    wait_projected(accord, SCALE, "scaled", 600, timeout=180)
    calls = json.loads(run_pod(accord, SCALE, "read-log", (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://applied-log.{SCALE}.svc/_calls').read().decode())"
    )).strip().splitlines()[-1])  # fmt: skip
    applied = [e for c in calls if c["path"] == "/applied" for e in c["body"]]
    assert {e["id"] for e in applied} == {f"o-{i}" for i in range(600)}  # none lost
    for k in range(12):
        mine = [int(e["id"][2:]) for e in applied if e["partitionkey"] == f"c{k}"]
        expected = k  # the key's next event not yet applied: o-k, o-(k+12), ...
        for n in mine:
            assert n <= expected, (f"c{k}: o-{n} before o-{expected}", mine)
            if n == expected:
                expected += 12
        assert expected >= 600, (f"c{k} stopped at o-{expected}", mine)


def test_projection_example_is_accepted(accord: E2ECluster) -> None:
    accord.kubectl("apply", "-n", SHOP, "-f", str(EXAMPLES / "projection-orders.yaml"))
    accord.wait_until(
        "the example projection reconciled",
        lambda: all(
            (i.get("status") or {}).get("phase") in ("Pending", "CatchingUp", "Live")
            for i in accord.get("proj", "-n", SHOP)["items"]
        ),
    )
    # A payload too big for a participant's /prepare is refused at admission, by field.
    big = {
        "apiVersion": "accord.dev/v1alpha1",
        "kind": "TwoPhaseTransaction",
        "metadata": {"name": "too-big", "namespace": SHOP},
        "spec": {
            "participants": [
                {"name": "small", "service": "ledger-a", "payload": {"a": 1}},
                {"name": "big", "service": "ledger-b", "payload": {"b": "x" * (300 << 10)}},
            ]
        },
    }
    refused = accord.kubectl("create", "-f", "-", input=json.dumps(big), check=False, stderr=True)
    assert "spec.participants[1].payload: Too long" in refused, refused
    # One within bounds is admitted with the coordinator's finalizer already on.
    big["spec"]["participants"][1]["payload"] = {"b": 1}
    admitted = json.loads(accord.kubectl(
        "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(big),
    ))  # fmt: skip
    assert admitted["metadata"]["finalizers"] == ["accord.dev/tpc-phase2"]


def test_a_tenant_who_cannot_create_pods_is_refused_a_job_step_saga(accord: E2ECluster) -> None:
    tenant = "tenant"
    accord.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": tenant}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "saga-author"},
            "rules": [{"apiGroups": ["accord.dev"], "resources": ["sagaworkflows"],
                       "verbs": ["create", "get"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "saga-author"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "saga-author"},
            "subjects": [{"kind": "ServiceAccount", "name": tenant, "namespace": SHOP}],
        },
        namespace=SHOP,
    )  # fmt: skip
    as_tenant = f"--as=system:serviceaccount:{SHOP}:{tenant}"

    def saga(name: str, job: bool) -> str:
        step = (
            {"job": {"image": accord.images["samples"], "serviceAccountName": SHOP}}
            if job
            else {"http": {"service": "inventory", "path": "/reserve"}}
        )
        doc = {
            "apiVersion": "accord.dev/v1alpha1",
            "kind": "SagaWorkflow",
            "metadata": {"name": name, "namespace": SHOP},
            "spec": {"steps": [{"name": "s", "action": step}]},
        }
        return json.dumps(doc)

    refused = accord.kubectl(
        "create", as_tenant, "-f", "-", input=saga("tenant-job", job=True), check=False,
        stderr=True,
    )  # fmt: skip
    assert "spec.steps[0].action.job" in refused and "create pods" in refused, refused
    assert "NotFound" in accord.kubectl(
        "get", "saga", "tenant-job", "-n", SHOP, check=False, stderr=True
    )
    # The same tenant may still create sagas that only call services.
    accord.kubectl("create", as_tenant, "-f", "-", input=saga("tenant-http", job=False))
    # And whoever may create pods may create job-step sagas (the fixture's admin did above).


def test_each_component_is_granted_exactly_the_calls_it_makes(accord: E2ECluster) -> None:
    controller = f"{RELEASE}-controller"
    rules = accord.get("clusterrole", controller)["rules"]
    rules += accord.get("role", f"{controller}-token", "-n", SYSTEM)["rules"]
    assert rules_to_grants(rules) == CONTROLLER
    assert rules_to_grants(accord.get("clusterrole", f"{RELEASE}-webhook")["rules"]) == WEBHOOK
    if accord.audit_log is None:
        pytest.skip("kind: its API server's audit log is not ours to read")
    # Every call made so far (sagas, job steps, kills, misses) was granted...
    used = accord.calls_of(f"system:serviceaccount:{SYSTEM}:{controller}")
    for key, verbs in used.items():
        assert verbs <= CONTROLLER.get(key, frozenset()), (key, verbs)
    # ...and every grant was used, or is one of the few no scenario reaches (said why).
    unused = {
        key: verbs - used.get(key, set())
        for key, verbs in CONTROLLER.items()
        if verbs - used.get(key, set())
    }
    assert unused == {key: verbs for key, (verbs, _) in CONTROLLER_NOT_SEEN.items()}, (
        f"granted but never called: {unused}; called: {used}"
    )
    # The webhook asked exactly its one question (the tenant's job-step saga, above).
    assert accord.calls_of(f"system:serviceaccount:{SYSTEM}:{RELEASE}-webhook") == {
        key: set(verbs) for key, verbs in WEBHOOK.items()
    }


def test_helm_upgrade_keeps_certificates_and_injection(accord: E2ECluster) -> None:
    secret = f"{RELEASE}-webhook-tls"
    before = accord.get("secret", secret, "-n", SYSTEM)["data"]
    accord.helm(
        "upgrade", RELEASE, str(CHART), "-n", SYSTEM, "--reuse-values",
        "--set", "webhook.replicas=1", "--wait", "--timeout", "5m",
    )  # fmt: skip
    assert accord.get("secret", secret, "-n", SYSTEM)["data"] == before
    assert accord.get("deployment", f"{RELEASE}-webhook", "-n", SYSTEM)["spec"]["replicas"] == 1
    accord.kubectl("rollout", "restart", "deployment/shipping", "-n", SHOP)
    accord.kubectl("rollout", "status", "deployment/shipping", "-n", SHOP, "--timeout=120s")
    pod = accord.get("pods", "-n", SHOP, "-l", "app=shipping")["items"]
    assert all(p["spec"]["initContainers"][0]["name"] == "accord-sidecar" for p in pod)
    accord.apply(
        yaml.safe_load((EXAMPLES / "saga-order.yaml").read_text())
        | {"metadata": {"name": "order-after-upgrade"}},
        namespace=SHOP,
    )
    assert saga_phase_eventually(accord, "order-after-upgrade") == "Succeeded"


def test_helm_uninstall_leaves_no_accord_object_and_no_stuck_namespace(
    accord: E2ECluster,
) -> None:
    # A saga still running at uninstall time: its participant is not there yet.
    stuck = {
        "apiVersion": "accord.dev/v1alpha1",
        "kind": "SagaWorkflow",
        "metadata": {"name": "never-finishes"},
        "spec": {
            "steps": [
                {
                    "name": "call",
                    "action": {"http": {"service": "nobody", "path": "/x"}},
                    "retry": {"maxAttempts": 100},
                }
            ]
        },
    }
    accord.apply(stuck, namespace=SHOP)
    accord.wait_until(
        "the saga running", lambda: saga_phase(accord, SHOP, "never-finishes") == "Running"
    )
    accord.helm("uninstall", RELEASE, "-n", SYSTEM, "--wait", "--timeout", "5m")
    for kind in ("sagaworkflows", "twophasetransactions", "cqrsprojections"):
        assert accord.get(kind, "-A")["items"] == []
    assert not accord.kubectl(
        "get", "mutatingwebhookconfigurations,clusterroles,clusterrolebindings",
        "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    ).strip()  # fmt: skip
    # Nothing holds the namespace: its deletion completes (kubectl waits, or fails).
    accord.kubectl("delete", "namespace", SHOP, "--timeout=120s")
