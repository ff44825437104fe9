"""The sidecar's own HTTP/1.1 (accord_sidecar.fasthttp) against real sockets: what a
framework used to do for us. Clients that pipeline, chunk or expect; upstreams that chunk,
answer until they close, drop idle keep-alive connections, or answer HEAD."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.dataplane import Recorder, Sidecar, request


def _exchange(port: int, data: bytes, until: bytes = b"", timeout: float = 10) -> bytes:
    """Send raw bytes; what came back (until `until` was seen, or the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while not (until and until in got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


@pytest.fixture
def app_and_sidecar(spawn: Callable[..., Any]) -> tuple[Recorder, Sidecar]:
    app: Recorder = spawn(Recorder, "inventory")
    sidecar: Sidecar = spawn(
        Sidecar, "caller", ACCORD_SERVICES=f"inventory={app.url.removeprefix('http://')}",
        ACCORD_SHARED_TOKEN="t", ACCORD_APP_PORT=str(app.port), ACCORD_HTTP_ENGINE="fast",
    )  # fmt: skip
    return app, sidecar


def test_pipelined_requests_are_answered_in_order(
    app_and_sidecar: tuple[Recorder, Sidecar],
) -> None:
    app, sidecar = app_and_sidecar
    app.behave({"path": "/first", "delayMs": 300})  # the first answer comes last at the app
    requests = b"".join(
        b"GET /v1/invoke/inventory/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name
        for name in (b"first", b"second", b"third")
    )
    got = _exchange(sidecar.http_port, requests + b"GET /v1/invoke/inventory/last HTTP/1.1\r\n"
                    b"Host: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    answers = got.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 4 and all(a.startswith(b"200 ") for a in answers), got
    paths = [c["path"] for c in app.calls()]
    assert paths[-4:] == ["/first", "/second", "/third", "/last"]
    # Each answer is its own request's: the Recorder numbers its calls in order.
    assert [b'"path": "/%s"' % p in a for p, a in zip(
        (b"first", b"second", b"third", b"last"), answers, strict=True)] == [True] * 4  # fmt: skip


def test_a_chunked_request_body_reaches_the_app_whole(
    app_and_sidecar: tuple[Recorder, Sidecar],
) -> None:
    app, sidecar = app_and_sidecar
    got = _exchange(sidecar.http_port,
                    b"POST /v1/invoke/inventory/up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"4\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")  # fmt: skip
    assert got.startswith(b"HTTP/1.1 200 "), got
    assert app.calls("/up")[-1]["body"] == {"a": 1}


def test_expect_other_than_continue_is_refused(app_and_sidecar: tuple[Recorder, Sidecar]) -> None:
    _, sidecar = app_and_sidecar
    got = _exchange(sidecar.inbound_port,
                    b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 2\r\n"
                    b"Authorization: Bearer t\r\n\r\n{}")  # fmt: skip
    assert got.startswith(b"HTTP/1.1 417 "), got


def test_expect_continue_gets_100_once_authenticated(
    app_and_sidecar: tuple[Recorder, Sidecar],
) -> None:
    app, sidecar = app_and_sidecar
    with socket.create_connection(("127.0.0.1", sidecar.inbound_port), timeout=10) as s:
        s.sendall(b"POST /charge HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 2\r\nAuthorization: Bearer t\r\n\r\n")  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"{}")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert app.calls("/charge")[-1]["body"] == {}


BIG = bytes(range(256)) * 1200  # 300 KB: over what is held whole
RELEASE = threading.Event()


class _Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def odd_upstream() -> Iterator[tuple[int, list[str]]]:
    """An HTTP/1.1 server with odd but legal habits, by path: /chunked answers in chunks,
    /until-close has no length and closes, /head answers HEAD with a length and no body,
    /big answers 300 KB with a length, /stream sends "first", then "second" only once the
    test says so (RELEASE), anything else answers with a length and then closes the
    kept-alive connection a moment later (as servers do with idle ones). Records every
    request line."""
    seen: list[str] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                length = 0
                while (header := self.rfile.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                self.rfile.read(length)
                seen.append(line.decode().strip())
                path = line.split()[1]
                if path == b"/chunked":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")  # fmt: skip
                elif path == b"/until-close":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
                    return
                elif path == b"/big":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(BIG), BIG))  # fmt: skip
                elif path == b"/stream":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"5\r\nfirst\r\n")  # fmt: skip
                    self.wfile.flush()
                    RELEASE.wait(20)
                    self.wfile.write(b"6\r\nsecond\r\n0\r\n\r\n")
                elif path == b"/head":
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Head: y\r\n\r\n"
                    self.wfile.write(head)
                else:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    self.wfile.flush()
                    threading.Timer(0.2, self.connection.close).start()
                    return

    server = _Upstream(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_upstream_answers_in_chunks_until_close_and_to_head(
    spawn: Callable[..., Any], odd_upstream: tuple[int, list[str]]
) -> None:
    port, _ = odd_upstream
    sidecar: Sidecar = spawn(Sidecar, "caller", ACCORD_SERVICES=f"odd=127.0.0.1:{port}",
                             ACCORD_HTTP_ENGINE="fast")  # fmt: skip
    status, body, headers = request("GET", f"{sidecar.api}/v1/invoke/odd/chunked", raw=True)
    assert (status, body) == (200, "hello world")
    assert headers.get("Transfer-Encoding") == "chunked"  # of unknown length: streamed on
    status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/odd/until-close", raw=True)
    assert (status, body) == (200, "all of it")
    status, body, headers = request("HEAD", f"{sidecar.api}/v1/invoke/odd/head", raw=True)
    assert status == 200 and headers.get("X-Head") == "y" and body == ""
    # The connection after a HEAD is not reused half-read: the next call is answered right.
    status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/odd/chunked", raw=True)
    assert (status, body) == (200, "hello world")


def test_an_upstream_that_drops_idle_connections_costs_no_failed_call(
    spawn: Callable[..., Any], odd_upstream: tuple[int, list[str]]
) -> None:
    """Every answer is followed by the upstream closing the connection a moment later:
    the next call finds its pooled connection closed and goes on a fresh one (an
    idempotent call may also be replayed if the close came as it was sent)."""
    port, seen = odd_upstream
    sidecar: Sidecar = spawn(Sidecar, "caller", ACCORD_SERVICES=f"odd=127.0.0.1:{port}",
                             ACCORD_RETRY_MAX_ATTEMPTS="1", ACCORD_HTTP_ENGINE="fast")  # fmt: skip
    for i in range(5):
        status, body, _ = request("GET", f"{sidecar.api}/v1/invoke/odd/n{i}", raw=True)
        assert (status, body) == (200, "ok"), i
        threading.Event().wait(0.3)  # the upstream has closed it by now
    assert [line.split()[1] for line in seen] == [f"/n{i}" for i in range(5)]


def test_a_chunked_body_over_the_limit_is_refused_even_once_it_arrived_whole(
    spawn: Callable[..., Any],
) -> None:
    app: Recorder = spawn(Recorder, "inventory")
    sidecar: Sidecar = spawn(
        Sidecar, "caller", ACCORD_SERVICES=f"inventory={app.url.removeprefix('http://')}",
        ACCORD_MAX_BODY_BYTES="10", ACCORD_HTTP_ENGINE="fast",
    )  # fmt: skip
    chunked = b"5\r\n12345\r\n5\r\n67890\r\n5\r\nabcde\r\n0\r\n\r\n"  # 15 bytes in all
    got = _exchange(sidecar.http_port,
                    b"POST /v1/invoke/inventory/big HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunked)  # fmt: skip
    assert got.startswith(b"HTTP/1.1 413 "), got
    assert app.calls("/big") == []


def test_a_big_or_slow_answer_is_streamed_on_as_it_arrives(
    spawn: Callable[..., Any], odd_upstream: tuple[int, list[str]]
) -> None:
    """The caller gets the first part of an answer while the upstream still holds the rest
    (it sends the rest only once the caller has the first); a 300 KB answer arrives whole;
    the pooled connection is fit for the next call after each."""
    port, _ = odd_upstream
    sidecar: Sidecar = spawn(Sidecar, "caller", ACCORD_SERVICES=f"odd=127.0.0.1:{port}",
                             ACCORD_HTTP_ENGINE="fast")  # fmt: skip
    RELEASE.clear()
    with socket.create_connection(("127.0.0.1", sidecar.http_port), timeout=10) as s:
        s.sendall(b"GET /v1/invoke/odd/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"first" not in got:
            got += s.recv(65536)  # would time out if the sidecar waited for the whole body
        assert got.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in got
        RELEASE.set()
        while not got.endswith(b"0\r\n\r\n"):
            got += s.recv(65536)
        assert b"6\r\nsecond\r\n" in got
        # The same client connection goes on.
        s.sendall(b"GET /v1/invoke/odd/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    chunks, data = body, b""
    while chunks:  # de-chunk
        size_line, _, chunks = chunks.partition(b"\r\n")
        size = int(size_line, 16)
        data, chunks = data + chunks[:size], chunks[size + 2 :]
        if size == 0:
            break
    assert data == BIG
    status, text, _ = request("GET", f"{sidecar.api}/v1/invoke/odd/chunked", raw=True)
    assert (status, text) == (200, "hello world")
