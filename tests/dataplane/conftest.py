"""Fixtures for data-plane tests: real nats-server, real sidecars, real sample services."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dataplane import NatsServer, Process

if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
    raise RuntimeError(
        "nats-server is not installed: run hack/setup.sh (apt-get install nats-server)"
    )


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path).start()
    yield server
    server.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """spawn(Sidecar, name=..., **env) / spawn(Recorder, name): started, and closed after."""
    started: list[Process] = []

    def _spawn(kind: type[Process], *args: Any, **kwargs: Any) -> Any:
        process = kind(tmp_path, *args, **kwargs).start()  # type: ignore[call-arg]
        started.append(process)
        return process

    yield _spawn
    for p in reversed(started):
        p.close()
