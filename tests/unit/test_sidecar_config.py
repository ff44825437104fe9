"""The sidecar's configuration: every bad variable is named."""

from __future__ import annotations

import pytest

from accord_sidecar.config import Config, ConfigError


def test_defaults() -> None:
    c = Config.from_env({})
    assert (c.http_port, c.inbound_port, c.admin_port) == (3500, 3501, 9090)
    assert c.auth_mode == "none" and c.subscribe == () and c.retry.max_attempts == 3


def test_services_and_targets() -> None:
    c = Config.from_env(
        {
            "ACCORD_SERVICES": "inventory=127.0.0.1:81, payment=http://h:82",
            "ACCORD_TARGETS": '{"payment": {"timeoutMs": 500}}',
        }
    )
    assert c.services == {"inventory": "http://127.0.0.1:81", "payment": "http://h:82"}
    assert c.targets == {"payment": {"timeoutMs": 500}}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ACCORD_HTTP_PORT": "web"}, "ACCORD_HTTP_PORT"),
        ({"ACCORD_MAX_DELIVERIES": "0"}, "ACCORD_MAX_DELIVERIES"),
        ({"ACCORD_SUBSCRIBE": "orders events", "ACCORD_APP_PORT": "80"}, "ACCORD_SUBSCRIBE"),
        ({"ACCORD_SUBSCRIBE": "orders"}, "ACCORD_APP_PORT"),
        ({"ACCORD_SERVICES": "inventory"}, "ACCORD_SERVICES"),
        ({"ACCORD_TARGETS": "{"}, "ACCORD_TARGETS"),
        ({"ACCORD_TARGETS": '{"p": {"timeoutMs": -1}}'}, "ACCORD_TARGETS.p.timeoutMs"),
        ({"ACCORD_TARGETS": '{"p": {"retries": 1}}'}, "ACCORD_TARGETS.p.retries"),
    ],
)
def test_bad_variables_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Config.from_env(env)
