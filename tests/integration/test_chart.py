"""The Helm chart and the rendered install.yaml: same CRDs as crds/, values that switch
what they say, and objects the real API server accepts."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from accord_operator.envtest.binaries import find_helm, pinned_kubernetes_version
from tests.support.cluster import CRDS, REPO, Cluster

CHART = REPO / "manifests" / "chart"


def render(
    *sets: str, namespace: str = "accord-system", crds: bool = False
) -> list[dict[str, Any]]:
    args = [
        str(find_helm()),
        "template",
        "accord",
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        pinned_kubernetes_version().lstrip("v"),
    ]
    if crds:
        args.append("--include-crds")
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_crds_are_the_crds_directory_not_a_copy() -> None:
    for crd in CRDS.glob("*.yaml"):
        linked = CHART / "crds" / crd.name
        assert linked.is_symlink() and linked.resolve() == crd.resolve()
    rendered = {
        d["metadata"]["name"]: d for d in by_kind(render(crds=True), "CustomResourceDefinition")
    }
    source = {
        d["metadata"]["name"]: d
        for d in (yaml.safe_load(p.read_text()) for p in CRDS.glob("*.yaml"))
    }
    assert rendered == source


def test_helm_lint() -> None:
    result = subprocess.run(
        [
            str(find_helm()),
            "lint",
            str(CHART),
            "--kube-version",
            pinned_kubernetes_version().lstrip("v"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_defaults_split_controller_and_webhook_and_carry_the_ca() -> None:
    docs = render()
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    controller = deployments["accord-controller"]["spec"]
    webhook = deployments["accord-webhook"]["spec"]
    assert controller["replicas"] == 1 and controller["template"]["spec"]["containers"][0][
        "args"
    ] == ["run", "--controller-only"]
    assert webhook["replicas"] == 2 and webhook["template"]["spec"]["containers"][0]["args"] == [
        "run",
        "--webhook-only",
    ]
    mutating = {m["metadata"]["name"]: m for m in by_kind(docs, "MutatingWebhookConfiguration")}
    assert set(mutating) == {"accord-sidecar-injector", "accord-transaction-admission"}
    mwc = mutating["accord-sidecar-injector"]
    policies = {w["name"]: w["failurePolicy"] for w in mwc["webhooks"]}
    assert policies == {"namespace.inject.accord.dev": "Fail", "object.inject.accord.dev": "Ignore"}
    # Transactions: bounded payloads and the finalizer at creation, failing closed; never on
    # an update (the spec is immutable, and the operator's own patches need no webhook).
    (tpc,) = mutating["accord-transaction-admission"]["webhooks"]
    assert tpc["failurePolicy"] == "Fail"
    assert tpc["clientConfig"]["service"]["path"] == "/tpc-admission"
    assert [r["operations"] for r in tpc["rules"]] == [["CREATE"]]
    (secret,) = by_kind(docs, "Secret")
    hooks = [w for m in mutating.values() for w in m["webhooks"]]
    assert all(w["clientConfig"]["caBundle"] == secret["data"]["ca.crt"] for w in hooks)
    assert base64.b64decode(secret["data"]["tls.crt"]).startswith(b"-----BEGIN CERTIFICATE-----")
    excluded = mwc["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn" and {"kube-system", "accord-system"} <= set(
        excluded["values"]
    )


@pytest.mark.parametrize(
    ("sets", "check"),
    [
        (
            ["webhook.failurePolicy=Ignore"],
            lambda docs: (
                by_kind(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]["failurePolicy"]
                == "Ignore"
            ),
        ),
        (
            ["certManager.enabled=true"],
            lambda docs: (
                by_kind(docs, "Certificate")
                and by_kind(docs, "Issuer")
                and not by_kind(docs, "Secret")
                and "cert-manager.io/inject-ca-from"
                in by_kind(docs, "MutatingWebhookConfiguration")[0]["metadata"]["annotations"]
            ),
        ),
        (
            ["metrics.serviceMonitor.enabled=true"],
            lambda docs: len(by_kind(docs, "ServiceMonitor")) == 1,
        ),
        (
            ["watchNamespaces={a,b}"],
            lambda docs: (
                {"name": "ACCORD_NAMESPACES", "value": "a,b"}
                in by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0][
                    "env"
                ]
            ),
        ),
    ],
)
def test_values_switch_what_is_rendered(sets: list[str], check: Any) -> None:
    assert check(render(*sets))


def test_install_yaml_is_rendered_from_the_chart(tmp_path: Path) -> None:
    committed = (REPO / "manifests" / "install.yaml").read_text()
    subprocess.run([str(REPO / "hack" / "render-manifests.sh")], check=True, capture_output=True)
    assert (REPO / "manifests" / "install.yaml").read_text() == committed, (
        "manifests/install.yaml is stale: run hack/render-manifests.sh"
    )


def test_the_api_server_accepts_every_rendered_object(cluster: Cluster, namespace: str) -> None:
    docs = [d for d in render(namespace=namespace) if d["kind"] != "ServiceMonitor"]
    text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    # Server-side dry run: validated and admitted by the real API server, stored nowhere
    # (a live Fail webhook with no pods behind it would block every other test's pods).
    out = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=text)
    assert out.count("(server dry run)") == len(docs)


def _grants(docs: list[dict[str, Any]], namespace: str | None = None) -> Any:
    from accord_operator.permissions import rules_to_grants

    rules = [
        r
        for d in docs
        if d["kind"] in ("ClusterRole", "Role")
        and d["metadata"]["name"].startswith("accord-controller")
        and (namespace is None or d["kind"] == "ClusterRole"
             or d["metadata"].get("namespace") in (namespace, "accord-system"))
        for r in d["rules"]
    ]  # fmt: skip
    return rules_to_grants(rules)


def test_the_chart_grants_the_controller_exactly_the_calls_the_code_makes() -> None:
    from accord_operator.permissions import CONTROLLER

    assert _grants(render()) == CONTROLLER
    # Watching namespaces: the same calls, but pods, sagas and the rest only in those.
    docs = render("watchNamespaces={team-a,team-b}")
    assert _grants(docs, "team-a") == CONTROLLER
    (cluster_role,) = [
        d
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "accord-controller"
    ]
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
    }
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"} == {
        "team-a",
        "team-b",
        "accord-system",
    }


def test_controller_and_webhook_run_under_separate_service_accounts() -> None:
    docs = by_kind(render(), "Deployment")
    accounts = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["serviceAccountName"] for d in docs
    }
    assert accounts == {
        "accord-controller": "accord-controller",
        "accord-webhook": "accord-webhook",
    }
    from accord_operator.permissions import WEBHOOK, rules_to_grants

    docs = render()
    bound = {
        d["roleRef"]["name"]
        for d in docs
        if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
        for s in d["subjects"]
        if s.get("name") == "accord-webhook"
    }
    rules = [r for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] in bound
             for r in d["rules"]]  # fmt: skip
    assert rules_to_grants(rules) == WEBHOOK
