"""The kinds' types (accord_operator.kinds) and their schemas (crds/) say the same: the same
fields at every level, the same required ones. A field the code writes that the schema does
not know would be pruned by the API server (silently lost); a schema field the code does not
know is a promise nothing keeps."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, NotRequired, Required, get_args, get_origin, get_type_hints

import pytest
import yaml

from accord_operator.kinds import KINDS

CRDS = Path(__file__).resolve().parents[2] / "crds"
Shape = dict[str, Any]  # field -> (required, sub-shape or None for a leaf)


def schema_shape(node: dict[str, Any]) -> Shape | None:
    if node.get("type") == "array":
        return schema_shape(node["items"])
    props = node.get("properties")
    if not props:
        return None  # a leaf, or free-form JSON
    required = set(node.get("required") or [])
    return {k: (k in required, schema_shape(v)) for k, v in props.items()}


def _unwrap(t: Any) -> Any:
    while get_origin(t) in (NotRequired, Required, list) or (
        get_origin(t) in (typing.Union, types.UnionType)
    ):
        t = next(a for a in get_args(t) if a is not type(None))
    return t


def type_shape(t: Any) -> Shape | None:
    t = _unwrap(t)
    if not typing.is_typeddict(t):
        return None
    hints = get_type_hints(t, include_extras=True)
    # (Not __required_keys__: with postponed annotations Python 3.11 cannot see NotRequired.)
    return {k: (get_origin(v) is not NotRequired, type_shape(v)) for k, v in hints.items()}


def diff(code: Shape | None, schema: Shape | None, path: str) -> list[str]:
    if code is None or schema is None:
        return [] if code is None and schema is None else [f"{path}: object in one, leaf in other"]
    out = [
        f"{path}.{k}: written by the code, not in the schema" for k in code.keys() - schema.keys()
    ]
    out += [f"{path}.{k}: in the schema, unknown to the code" for k in schema.keys() - code.keys()]
    for k in code.keys() & schema.keys():
        if code[k][0] != schema[k][0]:
            out.append(f"{path}.{k}: required in {'code' if code[k][0] else 'schema'} only")
        out += diff(code[k][1], schema[k][1], f"{path}.{k}")
    return out


@pytest.mark.parametrize("plural", list(KINDS))
def test_types_and_schema_have_the_same_fields(plural: str) -> None:
    crd = yaml.safe_load((CRDS / f"accord.dev_{plural}.yaml").read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    spec_t, status_t = KINDS[plural]
    problems = diff(type_shape(spec_t), schema_shape(root["spec"]), f"{plural}.spec")
    problems += diff(type_shape(status_t), schema_shape(root["status"]), f"{plural}.status")
    assert problems == []


def conforms(value: Any, t: Any, path: str = "status") -> list[str]:
    """Fields of `value` its type does not know (recursively): what the API server prunes."""
    shape = type_shape(t)
    if shape is None:
        return []
    items = value if isinstance(value, list) else [value]
    hints = get_type_hints(_unwrap(t), include_extras=True)
    out = []
    for item in items:
        for k, v in item.items():
            if k not in shape:
                out.append(f"{path}.{k}")
            else:
                out += conforms(v, hints[k], f"{path}.{k}")
    return out


def test_the_checker_catches_a_field_the_schema_lacks() -> None:
    from accord_operator.kinds import SagaStatus

    assert conforms({"phase": "Running", "steps": [{"name": "a", "oops": 1}]}, SagaStatus) == [
        "status.steps.oops"
    ]
