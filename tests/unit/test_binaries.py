"""Where the control-plane binaries are looked for, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from accord_operator.envtest import binaries
from accord_operator.envtest.binaries import NAMES, find_binaries, pinned_kubernetes_version


def _fake(directory: Path, names: tuple[str, ...] = NAMES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        p = directory / name
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    return directory


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_pinned_version_comes_from_the_wrapper_module() -> None:
    assert pinned_kubernetes_version().startswith("v1.")


def test_kubebuilder_assets_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = _fake(clean_env / "assets")
    _fake(clean_env / "empty-path")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    found = find_binaries(build=False)
    assert (
        found.source == "KUBEBUILDER_ASSETS" and found.kube_apiserver == assets / "kube-apiserver"
    )


def test_incomplete_kubebuilder_assets_is_an_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(_fake(clean_env / "assets", ("etcd",))))
    with pytest.raises(RuntimeError, match="lacks one of"):
        find_binaries(build=False)


def test_path_before_cache(clean_env: Path) -> None:
    _fake(clean_env / "empty-path")
    _fake(binaries.cache_dir())
    assert find_binaries(build=False).source == "PATH"


def test_partial_path_falls_through_to_cache(clean_env: Path) -> None:
    _fake(clean_env / "empty-path", ("kubectl",))  # a lone kubectl on PATH is common
    _fake(binaries.cache_dir())
    found = find_binaries(build=False)
    assert found.source == "cache" and found.etcd.parent == binaries.cache_dir()
    assert str(clean_env / "cache" / "accord" / "k8s") in str(found.etcd)


def test_nothing_found_without_build_says_how_to_build(clean_env: Path) -> None:
    with pytest.raises(RuntimeError, match=r"build-binaries\.sh"):
        find_binaries(build=False)
