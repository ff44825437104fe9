"""accord-operator's command line, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from accord_operator.cli import main
from tests.support.cluster import EXAMPLES


def test_inject_prints_the_workload_with_the_sidecar(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inject", "-f", str(EXAMPLES / "workload-orders-api.yaml")]) == 0
    (deployment,) = list(yaml.safe_load_all(capsys.readouterr().out))
    pod = deployment["spec"]["template"]
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "accord-sidecar" and sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["ACCORD_SUBSCRIBE"] == "payments.events" and env["ACCORD_APP_PORT"] == "8080"
    assert "accord.dev/sidecar-status" in pod["metadata"]["annotations"]


def test_inject_legacy_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["inject", "--native", "false", "-f", str(EXAMPLES / "workload-orders-api.yaml")]) == 0
    )
    (deployment,) = list(yaml.safe_load_all(capsys.readouterr().out))
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert names == ["orders-api", "accord-sidecar"]


def test_inject_refuses_a_bad_annotation_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "pod.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "annotations": {"accord.dev/log-level": "loud"}},
                "spec": {"containers": [{"name": "a", "image": "a"}]},
            }
        )
    )
    assert main(["inject", "-f", str(bad)]) == 1
    assert "accord.dev/log-level: 'loud'" in capsys.readouterr().err


def test_bad_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ACCORD_NATIVE_SIDECARS", "sometimes")
    assert main(["run"]) == 2
    assert "ACCORD_NATIVE_SIDECARS" in capsys.readouterr().err
