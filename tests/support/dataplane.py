"""Real processes for data-plane tests: nats-server -js, the sidecar, sample services."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accord_operator.envtest.controlplane import die_with_parent, free_port
from tests.support.cluster import REPO

RECORDER = REPO / "examples" / "services" / "recorder.py"
SLOW_LINK = Path(__file__).resolve().parent / "slow_link.py"


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} not open after {timeout}s:\n{log.read_text()[-3000:]}")


class Process:
    """A child process with its log in a file; stopped (killed if need be) on close."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                preexec_fn=die_with_parent,  # an interrupted test run leaves nothing behind
            )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class NatsServer(Process):
    def __init__(self, tmp: Path, max_payload: int | None = None) -> None:
        self.port = free_port()
        self.store = tmp / "jetstream"
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        if max_payload is not None:
            conf = tmp / "nats.conf"
            conf.write_text(f"max_payload: {max_payload}\n")
            argv += ["-c", str(conf)]
        super().__init__(argv, tmp / "nats.log")

    def restart(self, *, lose_store: bool = False) -> NatsServer:
        """Killed and started again on the same port; with lose_store, back empty (no
        stream, no consumers), as after a lost volume."""
        self.kill()
        if lose_store:
            shutil.rmtree(self.store, ignore_errors=True)
        return self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        super().start()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log)
        return self


class Recorder(Process):
    """examples/services/recorder.py: records calls, misbehaves on request."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.port = free_port()
        self.name = name
        super().__init__(
            [sys.executable, str(RECORDER), "--port", str(self.port), "--name", name],
            tmp / f"{name}.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Recorder:
        super().start()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log)
        return self

    def calls(self, path: str | None = None) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = request("GET", f"{self.url}/_calls")[1]
        return [c for c in calls if path is None or c["path"] == path]

    def behave(self, *rules: dict[str, Any], reset: bool = False) -> None:
        request("POST", f"{self.url}/_behave", {"rules": list(rules), "reset": reset})


class Sidecar(Process):
    def __init__(self, tmp: Path, name: str = "sidecar", **env: str) -> None:
        self.http_port, self.inbound_port, self.admin_port = free_port(), free_port(), free_port()
        self.name = name
        super().__init__(
            [sys.executable, "-m", "accord_sidecar"],
            tmp / f"{name}.log",
            env={
                "ACCORD_HTTP_PORT": str(self.http_port),
                "ACCORD_INBOUND_PORT": str(self.inbound_port),
                "ACCORD_ADMIN_PORT": str(self.admin_port),
                "ACCORD_BIND_HOST": "127.0.0.1",
                "ACCORD_APP_ID": name,
                **env,
            },
        )

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def inbound(self) -> str:
        return f"http://127.0.0.1:{self.inbound_port}"

    def start(self) -> Sidecar:
        super().start()
        assert self.proc is not None
        _wait_port(self.admin_port, self.proc, self.log)
        _wait_port(self.http_port, self.proc, self.log)
        return self

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        text = request("GET", f"http://127.0.0.1:{self.admin_port}/metrics", raw=True)[1]
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0


@contextmanager
def slow_link(target: str, tmp: Path, *holds: str, port: int | None = None) -> Iterator[int]:
    """A relay to `target` (tests/support/slow_link.py) that holds the paths in `holds`
    ("PATH=MILLISECONDS", e.g. "/commit=60000") and delivers them even after the caller gave
    up; yields its port. What it holds when it is closed is lost."""
    port = port or free_port()
    argv = [sys.executable, str(SLOW_LINK), "--port", str(port), "--target", target]
    link = Process(argv + [a for h in holds for a in ("--hold", h)],
                   tmp / f"slow-link-{port}-{len(holds)}.log")  # fmt: skip
    try:
        link.start()
        assert link.proc is not None
        _wait_port(port, link.proc, link.log)
        yield port
    finally:
        link.close()


PROJECTOR = REPO / "examples" / "services" / "projector.py"


class ProjectorProcess(Process):
    """The sample projector (examples/services/projector.py) on `port`, its read model
    under the test's directory; `sidecar_port`: its sidecar's, for read-your-writes."""

    def __init__(self, tmp: Path, port: int, sidecar_port: int, topic: str) -> None:
        super().__init__(
            [sys.executable, str(PROJECTOR), "--port", str(port), "--host", "127.0.0.1",
             "--data", str(tmp)],
            tmp / "projector.log",
            env={"ACCORD_PROJECTION_TOPIC": topic, "ACCORD_SIDECAR_HTTP_PORT": str(sidecar_port)},
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.port = port

    def start(self) -> ProjectorProcess:
        super().start()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log)
        return self


def request(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bool = False,
    data: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers); never raises on HTTP error statuses."""
    payload = (
        data if data is not None else (json.dumps(body).encode() if body is not None else None)
    )
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=payload, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text, rh = r.status, r.read().decode(errors="replace"), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, text, rh = e.code, e.read().decode(errors="replace"), dict(e.headers)
    if raw:
        return status, text, rh
    try:
        return status, json.loads(text) if text else None, rh
    except ValueError:
        return status, text, rh


def wait_until(
    predicate: Any, timeout: float = 30, interval: float = 0.1, message: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(message or f"condition not met in {timeout}s (last: {last!r})")


def subscriber(
    spawn: Any, nats_url: str, name: str, topic: str, app: Recorder, **env: str
) -> Sidecar:
    """A sidecar subscribed to `topic` (comma-separated topics too) for `app`, with quick
    redeliveries, spawned by the test's `spawn` fixture."""
    sidecar: Sidecar = spawn(
        Sidecar,
        name,
        ACCORD_NATS_URL=nats_url,
        ACCORD_SUBSCRIBE=topic,
        ACCORD_APP_PORT=str(app.port),
        ACCORD_REDELIVERY_INITIAL_MS="20",
        ACCORD_REDELIVERY_MAX_MS="100",
        **env,
    )
    return sidecar
