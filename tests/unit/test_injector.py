"""The injector's pure core: decisions and JSON patches over many pod shapes."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accord_operator.injector.config import SIDECAR_NAME, STATUS, AnnotationError, parse
from accord_operator.injector.manual import inject_documents
from accord_operator.injector.patch import (
    Injector,
    build_patch,
    decide,
    has_sidecar,
    supports_native_sidecars,
)

NATIVE = Injector(
    image="accord/sidecar:test",
    version="0.1.0",
    nats_url="nats://n:4222",
    native_by_default=True,
    operator_namespace="accord-system",
)
LEGACY = Injector(
    image="accord/sidecar:test", version="0.1.0", nats_url="nats://n:4222", native_by_default=False
)


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "app"}], **spec},
    }
    if annotations is not None:
        p["metadata"]["annotations"] = annotations
    return p


def inject(p: dict[str, Any], injector: Injector = NATIVE) -> dict[str, Any]:
    out: dict[str, Any] = jsonpatch.apply_patch(p, build_patch(p, injector))
    return out


# -- decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "namespace", "enabled", "spec", "inject_it", "why"),
    [
        ({"accord.dev/inject": "true"}, "shop", False, {}, True, "accord.dev/inject=true"),
        ({}, "shop", True, {}, True, "accord.dev/injection=enabled"),
        ({"accord.dev/inject": "false"}, "shop", True, {}, False, "opted out"),
        ({"accord.dev/inject": "False"}, "shop", True, {}, False, "opted out"),
        ({}, "shop", False, {}, False, "not asked"),
        ({"accord.dev/inject": "true"}, "kube-system", True, {}, False, "never injected"),
        ({"accord.dev/inject": "true"}, "kube-public", False, {}, False, "never injected"),
        ({"accord.dev/inject": "true"}, "accord-system", False, {}, False, "never injected"),
        ({"accord.dev/inject": "true"}, "shop", True, {"hostNetwork": True}, False, "hostNetwork"),
    ],
)
def test_who_gets_the_sidecar(
    annotations: dict[str, str],
    namespace: str,
    enabled: bool,
    spec: dict[str, Any],
    inject_it: bool,
    why: str,
) -> None:
    d = decide(
        pod(annotations, **spec),
        namespace=namespace,
        namespace_enabled=enabled,
        operator_namespace="accord-system",
    )
    assert d.inject is inject_it and why in d.reason


def test_malformed_inject_annotation_is_refused_by_name() -> None:
    with pytest.raises(AnnotationError, match=r"accord\.dev/inject: 'yes'"):
        decide(pod({"accord.dev/inject": "yes"}), namespace="shop", namespace_enabled=False)


def test_a_pod_with_the_sidecar_is_left_alone() -> None:
    once = inject(pod({"accord.dev/inject": "true"}))
    assert (
        decide(once, namespace="shop", namespace_enabled=True).reason == "already has the sidecar"
    )
    assert build_patch(once, NATIVE) == []


# -- what is injected -------------------------------------------------------------------------


def test_native_sidecar_is_the_first_init_container_with_a_startup_probe() -> None:
    out = inject(pod({}, initContainers=[{"name": "migrate", "image": "m"}]))
    first = out["spec"]["initContainers"][0]
    assert first["name"] == SIDECAR_NAME and first["restartPolicy"] == "Always"
    # Its own health: /readyz waits for the app, which waits for this probe.
    assert first["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
    assert [c["name"] for c in out["spec"]["initContainers"]] == [SIDECAR_NAME, "migrate"]
    assert [c["name"] for c in out["spec"]["containers"]] == ["app"]
    # Other init containers start after the sidecar, so they can use it too.
    assert {"name": "ACCORD_HTTP_PORT", "value": "3500"} in out["spec"]["initContainers"][1]["env"]


def test_every_sidecar_port_setting_is_explicit_so_no_service_link_can_shadow_it() -> None:
    # The kubelet sets <SERVICE>_PORT=tcp://... for each Service in the namespace; a
    # Service named accord-app must not become the sidecar's ACCORD_APP_PORT.
    sidecar = inject(pod())["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    for name in ("ACCORD_HTTP_PORT", "ACCORD_INBOUND_PORT", "ACCORD_ADMIN_PORT", "ACCORD_APP_PORT"):
        assert name in env
    assert env["ACCORD_APP_PORT"] == ""


def test_legacy_sidecar_is_a_regular_container() -> None:
    out = inject(pod(), LEGACY)
    assert [c["name"] for c in out["spec"]["containers"]] == ["app", SIDECAR_NAME]
    assert "restartPolicy" not in out["spec"]["containers"][1]
    assert "initContainers" not in out["spec"]


def test_per_pod_override_of_native_mode() -> None:
    out = inject(pod({"accord.dev/native-sidecar": "false"}), NATIVE)
    assert out["spec"]["containers"][-1]["name"] == SIDECAR_NAME
    out = inject(pod({"accord.dev/native-sidecar": "true"}), LEGACY)
    assert out["spec"]["initContainers"][0]["name"] == SIDECAR_NAME


def test_annotations_become_sidecar_env_and_resources() -> None:
    out = inject(
        pod(
            {
                "accord.dev/app-port": "8080",
                "accord.dev/subscribe": "orders.events, payments",
                "accord.dev/retry-max-attempts": "5",
                "accord.dev/log-level": "DEBUG",
                "accord.dev/sidecar-memory-limit": "512Mi",
                "accord.dev/sidecar-cpu-request": "100m",
                "accord.dev/subscribe-bulk": "50",
                "accord.dev/max-deliveries": "7",
                "accord.dev/tpc-outcome-after-seconds": "5",
            }
        )
    )
    sidecar = out["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["ACCORD_APP_PORT"] == "8080"
    assert env["ACCORD_SUBSCRIBE"] == "orders.events,payments"
    assert env["ACCORD_RETRY_MAX_ATTEMPTS"] == "5"
    assert env["ACCORD_BULK_MAX"] == "50" and env["ACCORD_MAX_DELIVERIES"] == "7"
    assert env["ACCORD_TPC_OUTCOME_AFTER_S"] == "5"
    assert env["ACCORD_LOG_LEVEL"] == "debug"
    assert env["ACCORD_NATS_URL"] == "nats://n:4222"
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_sidecar_meets_the_restricted_pod_security_standard() -> None:
    ctx = inject(pod())["spec"]["initContainers"][0]["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True


def test_status_annotation_records_what_and_which_version() -> None:
    out = inject(pod({"keep": "me"}))
    assert out["metadata"]["annotations"]["keep"] == "me"
    assert json.loads(out["metadata"]["annotations"][STATUS]) == {
        "containers": [SIDECAR_NAME],
        "image": "accord/sidecar:test",
        "native": True,
        "version": "0.1.0",
    }


def test_user_env_wins_over_injected_env() -> None:
    p = pod()
    p["spec"]["containers"][0]["env"] = [{"name": "ACCORD_HTTP_PORT", "value": "9999"}]
    env = inject(p)["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "ACCORD_HTTP_PORT"] == [
        {"name": "ACCORD_HTTP_PORT", "value": "9999"}
    ]
    assert any(e["name"] == "ACCORD_SIDECAR_URL" for e in env)


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({"accord.dev/app-port": "http"}, "accord.dev/app-port"),
        ({"accord.dev/app-port": "70000"}, "accord.dev/app-port"),
        ({"accord.dev/app-port": "3500"}, "accord.dev/app-port"),
        (
            {"accord.dev/subscribe": "orders events", "accord.dev/app-port": "80"},
            "accord.dev/subscribe",
        ),
        ({"accord.dev/subscribe": "orders"}, "accord.dev/subscribe needs accord.dev/app-port"),
        ({"accord.dev/log-level": "loud"}, "accord.dev/log-level"),
        ({"accord.dev/native-sidecar": "maybe"}, "accord.dev/native-sidecar"),
        ({"accord.dev/sidecar-memory-limit": "lots"}, "accord.dev/sidecar-memory-limit"),
        ({"accord.dev/retry-max-attempts": "0"}, "accord.dev/retry-max-attempts"),
        (
            {"accord.dev/retry-initial-ms": "500", "accord.dev/retry-max-ms": "100"},
            "accord.dev/retry-max-ms",
        ),
        ({"accord.dev/admin-port": "3501"}, "must differ"),
    ],
)
def test_bad_annotations_are_named(annotations: dict[str, str], named: str) -> None:
    with pytest.raises(AnnotationError, match=named):
        build_patch(pod(annotations), NATIVE)


def test_port_conflict_with_an_app_container_is_named() -> None:
    p = pod()
    p["spec"]["containers"][0]["ports"] = [{"containerPort": 9090}]
    with pytest.raises(AnnotationError, match=r"'app' uses port 9090.*accord\.dev/admin-port"):
        build_patch(p, NATIVE)
    p["metadata"]["annotations"] = {"accord.dev/admin-port": "9191"}
    assert inject(p)["spec"]["initContainers"][0]["ports"][1]["containerPort"] == 9191


@pytest.mark.parametrize(
    ("version", "native"),
    [
        ("v1.36.3", True),
        ("v1.29.0", True),
        ("v1.28.9", False),
        ("v1.30.2-eks-1234", True),
        ("v1.27.1+k3s1", False),
        ("v2.0.0", True),
        ("garbage", False),
    ],
)
def test_native_sidecars_from_the_cluster_version(version: str, native: bool) -> None:
    assert supports_native_sidecars(version) is native


# -- manual mode ------------------------------------------------------------------------------


def test_manual_injection_of_workload_templates() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": pod()},
    }
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": pod()}}},
    }
    opted_out = {"kind": "Deployment", "spec": {"template": pod({"accord.dev/inject": "false"})}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    out = inject_documents([deployment, cronjob, opted_out, service, None], NATIVE)
    assert has_sidecar(out[0]["spec"]["template"])
    assert has_sidecar(out[1]["spec"]["jobTemplate"]["spec"]["template"])
    assert not has_sidecar(out[2]["spec"]["template"])
    assert out[3] == service and out[4] is None
    assert inject_documents(out, NATIVE) == out  # twice changes nothing


# -- property-based: any pod shape ----------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_env = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["A", "B", "ACCORD_HTTP_PORT", "ACCORD_SIDECAR_URL"]),
            "value": st.text(max_size=5),
        }
    ),
    max_size=3,
    unique_by=lambda e: e["name"],
)


@st.composite
def _containers(draw: st.DrawFn, min_size: int) -> list[dict[str, Any]]:
    names = draw(
        st.lists(
            _names.filter(lambda n: n != SIDECAR_NAME), min_size=min_size, max_size=3, unique=True
        )
    )
    out = []
    for n in names:
        c: dict[str, Any] = {"name": n, "image": "img"}
        env = draw(st.one_of(st.none(), _env))
        if env is not None:
            c["env"] = env
        out.append(c)
    return out


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    p: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod"}
    metadata: dict[str, Any] = {"name": "p"}
    annotations = draw(
        st.one_of(
            st.none(),
            st.dictionaries(
                st.sampled_from(["a", "accord.dev/app-port", "accord.dev/native-sidecar", "x/y~z"]),
                st.sampled_from(["8080", "true", "false", "v"]),
                max_size=3,
            ),
        )
    )
    if annotations is not None:
        annotations = {
            k: v
            for k, v in annotations.items()
            if not (k == "accord.dev/app-port" and v != "8080")
            and not (k == "accord.dev/native-sidecar" and v not in ("true", "false"))
        }
        metadata["annotations"] = annotations
    if draw(st.booleans()):
        p["metadata"] = metadata
    spec: dict[str, Any] = {}
    containers = draw(st.one_of(st.none(), _containers(1)))
    if containers is not None:
        spec["containers"] = containers
    init = draw(st.one_of(st.none(), _containers(0)))
    if init is not None:
        spec["initContainers"] = init
    volumes = draw(
        st.one_of(
            st.none(),
            st.lists(
                st.fixed_dictionaries({"name": _names, "emptyDir": st.just({})}),
                max_size=2,
                unique_by=lambda v: v["name"],
            ),
        )
    )
    if volumes is not None:
        spec["volumes"] = volumes
    p["spec"] = spec
    return p


@settings(max_examples=400, deadline=None)
@given(pods(), st.sampled_from([NATIVE, LEGACY]))
def test_patch_always_applies_and_a_second_pass_changes_nothing(
    p: dict[str, Any], injector: Injector
) -> None:
    original = copy.deepcopy(p)
    ops = build_patch(p, injector)
    assert p == original  # pure: the input is not touched
    once = jsonpatch.apply_patch(p, ops)  # raises if any op does not apply
    assert has_sidecar(once)
    assert (
        sum(
            c["name"] == SIDECAR_NAME
            for c in [*once["spec"].get("containers", []), *once["spec"].get("initContainers", [])]
        )
        == 1
    )
    for c in once["spec"].get("containers", []):
        if c["name"] != SIDECAR_NAME:
            names = [e["name"] for e in c.get("env", [])]
            assert names.count("ACCORD_HTTP_PORT") == names.count("ACCORD_SIDECAR_URL") == 1
    assert build_patch(once, injector) == []
    assert STATUS in once["metadata"]["annotations"]
    # Everything the pod had is still there.
    for key, value in ((original.get("metadata") or {}).get("annotations") or {}).items():
        assert once["metadata"]["annotations"][key] == value


def test_parse_defaults() -> None:
    c = parse({})
    assert (c.ports.http, c.ports.inbound, c.ports.admin) == (3500, 3501, 9090)
    assert c.app_port is None and c.native is None and c.log_level == "info"


def test_target_policies_annotation_is_checked_and_passed_on() -> None:
    policies = '{"payment": {"timeoutMs": 500}}'
    out = inject(pod({"accord.dev/target-policies": policies}))
    env = {e["name"]: e.get("value") for e in out["spec"]["initContainers"][0]["env"]}
    assert env["ACCORD_TARGETS"] == policies
    with pytest.raises(AnnotationError, match="target-policies"):
        build_patch(pod({"accord.dev/target-policies": "[1]"}), NATIVE)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"labels": {"app.kubernetes.io/name": "orders"}, "name": "x"}, "orders"),
        ({"labels": {"app": "web"}}, "web"),
        ({"generateName": "orders-api-7d9f8c6b5-"}, "orders-api"),
        ({"generateName": "nightly-report-"}, "nightly-report"),
        ({"name": "my-app-x"}, "my-app-x"),
    ],
)
def test_app_id_names_every_replica_alike(meta: dict[str, Any], expected: str) -> None:
    from accord_operator.injector.patch import app_id

    assert app_id({"metadata": meta}) == expected
    p = pod()
    p["metadata"] = {**meta, "annotations": {}}
    env = {e["name"]: e.get("value") for e in inject(p)["spec"]["initContainers"][0]["env"]}
    assert env["ACCORD_APP_ID"] == expected


def test_a_pods_own_subscription_start_overrides_the_clusters() -> None:
    """The chart's nats.newSubscriptionsStart is every sidecar's default; a pod that asks
    for its own (a projection replays from the beginning) gets exactly one value, its own."""
    cluster = dataclasses.replace(
        NATIVE,
        broker_env=(("ACCORD_NEW_SUBSCRIPTIONS_START", "new"), ("ACCORD_STREAM_MAX_AGE_S", "60")),
    )

    def env_of(annotations: dict[str, str]) -> list[tuple[str, str]]:
        out = inject(pod({"accord.dev/inject": "true", **annotations}), cluster)
        return [(e["name"], e.get("value", "")) for e in out["spec"]["initContainers"][0]["env"]]

    own = env_of({"accord.dev/subscribe-start": "all"})
    assert [v for k, v in own if k == "ACCORD_NEW_SUBSCRIPTIONS_START"] == ["all"]
    assert ("ACCORD_STREAM_MAX_AGE_S", "60") in own
    default = env_of({})
    assert [v for k, v in default if k == "ACCORD_NEW_SUBSCRIPTIONS_START"] == ["new"]
    with pytest.raises(AnnotationError, match=r"accord\.dev/subscribe-start"):
        env_of({"accord.dev/subscribe-start": "latest"})
