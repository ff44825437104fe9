from __future__ import annotations

import pytest

from accord_operator.settings import Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.namespaces == () and s.metrics_port == 8080 and s.webhook_port == 9443


def test_from_env() -> None:
    s = Settings.from_env({"ACCORD_NAMESPACES": "a, b,,", "ACCORD_METRICS_PORT": "9000"})
    assert s.namespaces == ("a", "b") and s.metrics_port == 9000


@pytest.mark.parametrize("raw", ["eighty", "-1", "70000"])
def test_bad_port_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(ValueError, match="ACCORD_METRICS_PORT"):
        Settings.from_env({"ACCORD_METRICS_PORT": raw})
