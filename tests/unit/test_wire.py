"""The wire between operator and sidecar has one home (accord_wire), and both sides keep to
it: the env the injector writes is the env the sidecar reads (and accepts), both sides
classify answers alike, and both name headers alike."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accord_wire as wire
from accord_operator.injector.config import SIDECAR_NAME, AnnotationError
from accord_operator.injector.patch import Injector, build_patch
from accord_operator.settings import Settings
from accord_sidecar import inbound, resiliency
from accord_sidecar.config import Config, ConfigError

INJECTOR = Injector(
    image="accord/sidecar:test",
    version="0.1.0",
    nats_url="nats://nats.accord-system:4222",
    native_by_default=True,
    operator_namespace="accord-system",
    broker_env=Settings.from_env(
        {
            wire.SidecarEnv.STREAM_MAX_AGE_S: "3600",
            wire.SidecarEnv.STREAM_MAX_BYTES: "1000000",
            wire.SidecarEnv.STREAM_REPLICAS: "3",
            wire.SidecarEnv.STREAM_STORAGE: "Memory",
            wire.SidecarEnv.NEW_SUBSCRIPTIONS_START: "new",
        }
    ).broker_env,
)
# Every annotation that reaches the sidecar's env, set.
EVERYTHING = {
    "accord.dev/inject": "true",
    "accord.dev/app-port": "8080",
    "accord.dev/subscribe": "orders.created,payments",
    "accord.dev/log-level": "debug",
    "accord.dev/retry-max-attempts": "5",
    "accord.dev/retry-initial-ms": "50",
    "accord.dev/retry-max-ms": "800",
    "accord.dev/timeout-ms": "3000",
    "accord.dev/http-port": "3600",
    "accord.dev/inbound-port": "3601",
    "accord.dev/admin-port": "9191",
    "accord.dev/target-policies": json.dumps({"payment": {"timeoutMs": 500, "maxAttempts": 2}}),
    "accord.dev/subscribe-concurrency": "4",
    "accord.dev/subscribe-bulk": "8",
    "accord.dev/subscribe-partitions": "4",
    "accord.dev/subscribe-poison": "park",
    "accord.dev/subscribe-reset": "/projection/reset",
    "accord.dev/max-deliveries": "7",
    "accord.dev/tpc-outcome-after-seconds": "5",
    "accord.dev/subscribe-start": "new",
}


class Recording(dict[str, str]):
    """An environment that remembers which names were asked for."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)


def injected(annotations: Mapping[str, str]) -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "shop-7d4b9-x2x",
            "namespace": "shop",
            "annotations": dict(annotations),
        },
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }
    out: dict[str, Any] = jsonpatch.apply_patch(pod, build_patch(pod, INJECTOR))
    return out


def sidecar_env(pod: Mapping[str, Any]) -> Recording:
    """The sidecar container's env as the kubelet would resolve it."""
    spec = pod["spec"]
    (sidecar,) = [
        c
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        if c["name"] == SIDECAR_NAME
    ]
    fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": "shop"}
    env = Recording()
    for e in sidecar["env"]:
        env[e["name"]] = (
            e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        )
    return env


def test_every_variable_the_injector_writes_is_read_by_the_sidecar() -> None:
    env = sidecar_env(injected(EVERYTHING))
    written = set(env)
    config = Config.from_env(env)
    assert written - env.asked == set(), "written for the sidecar, never read by it"
    # ...and the wire names them all, so neither side spells one on its own.
    names = {v for k, v in vars(wire.SidecarEnv).items() if k.isupper() and isinstance(v, str)}
    assert written == names
    # The values mean the same on both sides.
    assert (config.http_port, config.inbound_port, config.admin_port) == (3600, 3601, 9191)
    assert config.app_port == 8080 and config.subscribe == ("orders.created", "payments")
    assert (config.stream_max_age_s, config.stream_max_bytes, config.stream_replicas) == (
        3600,
        1_000_000,
        3,
    )
    assert (config.stream_storage, config.new_subscriptions_start) == ("memory", "new")
    assert (config.retry.max_attempts, config.retry.initial_ms, config.retry.max_ms) == (5, 50, 800)
    assert config.timeout_ms == 3000 and config.log_level == "debug"
    assert config.targets == {"payment": {"timeoutMs": 500, "maxAttempts": 2}}
    assert (config.concurrency, config.bulk_max, config.max_deliveries) == (4, 8, 7)
    assert config.partitions == 4 and config.poison == "park"
    assert config.reset_path == "/projection/reset"
    assert config.namespace == "shop" and config.nats_url == INJECTOR.nats_url
    assert config.token_audience == wire.PARTICIPANT_AUDIENCE


def test_the_app_is_told_where_its_sidecar_is() -> None:
    app = next(c for c in injected(EVERYTHING)["spec"]["containers"] if c["name"] == "app")
    env = {e["name"]: e["value"] for e in app["env"]}
    assert set(env) == {v for k, v in vars(wire.AppEnv).items() if k.isupper()}
    assert env[wire.AppEnv.SIDECAR_URL] == "http://127.0.0.1:3600"


_policy_value = st.one_of(
    st.integers(-10, 4_000_000), st.booleans(), st.text(max_size=3), st.none(), st.floats()
)
_policies = st.one_of(
    st.dictionaries(
        st.sampled_from(["payment", "inventory"]),
        st.one_of(
            st.dictionaries(
                st.sampled_from([*wire.TARGET_FIELDS, "retries", "timeout"]), _policy_value
            ),
            st.integers(),
        ),
        max_size=2,
    ),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    annotations=st.fixed_dictionaries(
        {},
        optional={
            "accord.dev/app-port": st.sampled_from(["8080", "0", "3500", "99999", "x"]),
            "accord.dev/subscribe": st.sampled_from(["orders", "a..b", "", "x,y.z"]),
            "accord.dev/log-level": st.sampled_from(["info", "DEBUG", "loud"]),
            "accord.dev/retry-max-attempts": st.sampled_from(["1", "100", "101", "-1"]),
            "accord.dev/retry-initial-ms": st.sampled_from(["0", "500", "3600001"]),
            "accord.dev/retry-max-ms": st.sampled_from(["0", "100", "2000"]),
            "accord.dev/timeout-ms": st.sampled_from(["1", "0", "3600000"]),
            "accord.dev/subscribe-bulk": st.sampled_from(["1", "1000", "1001"]),
            "accord.dev/subscribe-concurrency": st.sampled_from(["1", "0"]),
            "accord.dev/max-deliveries": st.sampled_from(["1", "1001"]),
            "accord.dev/tpc-outcome-after-seconds": st.sampled_from(["1", "0", "86401"]),
            "accord.dev/subscribe-start": st.sampled_from(["all", "new", "latest"]),
            "accord.dev/target-policies": _policies.map(json.dumps),
        },
    )
)
def test_what_the_injector_admits_the_sidecar_accepts(annotations: dict[str, str]) -> None:
    """No pod is admitted whose sidecar would then refuse its own env and crash-loop."""
    try:
        pod = injected({"accord.dev/inject": "true", **annotations})
    except AnnotationError:
        return  # refused at admission, by name: fine
    try:
        Config.from_env(sidecar_env(pod))
    except ConfigError as exc:
        pytest.fail(f"admitted {annotations}, but the sidecar refuses it: {exc}")


def test_both_sides_agree_on_which_answers_mean_try_again() -> None:
    for status in range(100, 600):
        again = wire.try_again(status)
        assert resiliency.retryable_status(status) == again, status  # sidecar invoke retries
        assert inbound.final(status) == (not again), status  # sidecar dedup keeps finals only
    assert [s for s in (400, 404, 408, 409, 422, 429, 500, 501, 503) if wire.try_again(s)] == [
        408, 409, 429, 500, 501, 503,
    ]  # fmt: skip


async def test_the_operator_retries_a_step_exactly_when_the_wire_says_try_again() -> None:
    """A real participant answering each status; the operator's own verdict on each."""
    from aiohttp import web

    from accord_operator.participants import Participants

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"status": "x"}, status=int(request.match_info["code"]))

    app = web.Application()
    app.router.add_post("/{code}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    participants = Participants(api=None, token="t")  # type: ignore[arg-type]
    try:
        for status in (200, 302, 400, 404, 408, 409, 422, 429, 500, 501, 503):
            got = await participants.call(f"http://127.0.0.1:{port}/{status}", {}, {}, 5)
            assert got.ok == (status == 200), status
            if not got.ok:
                assert got.retryable == wire.try_again(status), status
    finally:
        await participants.close()
        await runner.cleanup()


def test_both_sides_name_the_idempotency_header_alike() -> None:
    assert inbound.IDEMPOTENCY_KEY == wire.IDEMPOTENCY_KEY
    assert resiliency.may_retry_request("POST", {wire.IDEMPOTENCY_KEY.lower(): "k"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (wire.SidecarEnv.STREAM_MAX_AGE_S, "a week"),
        (wire.SidecarEnv.STREAM_REPLICAS, "7"),
        (wire.SidecarEnv.STREAM_STORAGE, "disk"),
        (wire.SidecarEnv.NEW_SUBSCRIPTIONS_START, "latest"),
    ],
)
def test_a_bad_broker_setting_stops_the_operator_naming_it(name: str, value: str) -> None:
    """Checked once where the chart sets it, so no sidecar fails later on a value the
    operator passed along."""
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value})
