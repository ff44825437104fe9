"""The sidecar image recipe: what can be checked without a Docker engine."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar_images" / "sidecar"


def test_sidecar_imports_only_what_the_image_installs() -> None:
    allowed = {
        "aiohttp", "nats", "prometheus_client", "multidict", "yarl", "uvloop", "httptools",
        "accord_sidecar",
        "accord_wire",  # copied into the image beside accord_sidecar (see the Dockerfile)
    }  # fmt: skip
    wanted = {
        line.split("==")[0].replace("-", "_").replace("nats_py", "nats")
        for line in (SIDECAR / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert wanted == {"aiohttp", "httptools", "nats", "prometheus_client", "uvloop"}
    dockerfile = (SIDECAR / "Dockerfile").read_text()
    assert "COPY accord_wire " in dockerfile and "COPY accord_sidecar " in dockerfile
    for path in [
        *(SIDECAR / "accord_sidecar").rglob("*.py"),
        *(SIDECAR / "accord_wire").rglob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in allowed, (
                    f"{path.name} imports {name}"
                )


def test_dockerfile_runs_as_non_root_from_a_pinned_slim_base() -> None:
    lines = (SIDECAR / "Dockerfile").read_text().splitlines()
    # The base is a build argument (a registry-less machine builds on a base of its own);
    # its default is the pinned public slim image, and every stage uses it.
    (default,) = [line.split("=", 1)[1] for line in lines if line.startswith("ARG BASE=")]
    assert default.startswith("python:3.11.") and "slim" in default
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases and all(b == "${BASE}" for b in bases)
    assert lines.count("USER 65532:65532") == 1
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    assert not any("apt-get" in line or "gcc" in line for line in final)  # no build tools
    assert any(line.startswith("ENTRYPOINT") and "accord_sidecar" in line for line in final)
