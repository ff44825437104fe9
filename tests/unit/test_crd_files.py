"""Static checks of crds/: what `kubectl explain` and `kubectl get` will show users."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"
FILES = sorted(CRDS.glob("*.yaml"))


def _crd(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _fields(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from _fields(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _fields(schema["items"], f"{path}[]")


def test_there_are_three_crds() -> None:
    assert [p.name for p in FILES] == [
        "accord.dev_cqrsprojections.yaml",
        "accord.dev_sagaworkflows.yaml",
        "accord.dev_twophasetransactions.yaml",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_field_has_a_description(path: Path) -> None:
    schema = _crd(path)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = [
        f for f, sub in _fields(schema, "") if f != ".metadata" and not sub.get("description")
    ]
    assert missing == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_names_status_and_columns(path: Path) -> None:
    crd = _crd(path)
    spec = crd["spec"]
    assert spec["group"] == "accord.dev" and spec["scope"] == "Namespaced"
    assert "accord" in spec["names"]["categories"]
    assert spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[0] == "Phase" and columns[-1] == "Age"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"phase", "observedGeneration", "conditions"} <= status.keys()
    condition = status["conditions"]["items"]
    assert condition["required"] == ["type", "status", "lastTransitionTime", "reason", "message"]
    assert "Pending" in status["phase"]["enum"]
