"""The sidecar's own HTTP/1.1 server and upstream client: asyncio protocols over httptools'
parser, no framework. The sidecar's ports are served here: a request costs a parse, a dict
of headers and one write. Handlers take a `Request` (the subset of aiohttp's web.Request
the sidecar uses, so the same handlers serve ACCORD_HTTP_ENGINE=aiohttp) and return a
`Reply`. Nothing here imports aiohttp: a sidecar on this engine starts without it.

What a slow or broken client gets, as before: headers must arrive within the header timeout
(no slowloris), a body within the body timeout (408), over the size limit a 413 before the
body is read, something that is not HTTP a 400; each of those closes the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools
from multidict import CIMultiDict, MultiDict

log = logging.getLogger("accord.sidecar.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})


class Reply:
    """A response built without aiohttp: status, headers (name, value) and body (bytes, or a
    BodyStream still arriving from an upstream)."""

    __slots__ = ("body", "close", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes | BodyStream,
        close: bool = False,
    ) -> None:
        self.status, self.headers, self.body, self.close = status, headers, body, close


def json_reply(data: Any, status: int = 200) -> Reply:
    body = json.dumps(data).encode()
    return Reply(status, [("Content-Type", "application/json; charset=utf-8")], body)


class BodyError(Exception):
    """The body could not be read: (status, code, message) for the error answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Request:
    """One request as the handlers see it (aiohttp's web.Request, as far as they use it)."""

    __slots__ = (
        "_body",
        "_chunks",
        "_conn",
        "_continue",
        "_done",
        "_lost",
        "_size",
        "_too_large",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "match_info",
        "method",
        "raw_path",
        "version",
    )

    def __init__(self, conn: ServerConnection) -> None:
        self._conn = conn
        self.method = ""
        self.raw_path = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.version = "1.1"
        self.keep_alive = True
        self.match_info: dict[str, str] = {}
        self.content_length: int | None = None
        self.chunked = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._continue = False  # Expect: 100-continue, not answered yet
        self._done: asyncio.Future[None] | None = None  # the body arrived (or never will)
        self._lost = False
        self._body: bytes | None = None

    @property
    def path(self) -> str:
        return unquote(self.raw_path.partition("?")[0])

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(parse_qsl(self.raw_path.partition("?")[2], keep_blank_values=True))

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def body_complete(self) -> bool:
        return self._body is not None

    async def read(self, limit: int, timeout_s: float) -> bytes:
        """The whole body; BodyError (413, 408, 400) when it is over `limit`, does not arrive
        within `timeout_s`, or the client gave up sending it."""
        if self._too_large:  # (a chunked body that arrived whole before it was asked for)
            raise _too_large(limit)
        if self._body is not None:
            return self._body
        if self.content_length is not None and self.content_length > limit:
            raise _too_large(limit)
        if self._continue:  # the handler wants it: now the client may send it
            self._continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        if not self._done.done():
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self._done)
            except TimeoutError:
                log.info("%s %s: body not received within %ss", self.method, self.path, timeout_s)
                raise BodyError(
                    408, "body_timeout", f"the body did not arrive within {timeout_s}s"
                ) from None
        if self._lost or self._body is None:
            log.info("%s %s: client gave up sending its body", self.method, self.path)
            raise BodyError(400, "body_incomplete", "the body ended before its length")
        if self._too_large:
            raise _too_large(limit)
        return self._body

    # -- fed by the connection --------------------------------------------------------------
    def _add(self, chunk: bytes, limit: int) -> None:
        self._size += len(chunk)
        if self._size > limit:
            self._too_large = True
            self._chunks.clear()
        elif not self._too_large:
            self._chunks.append(chunk)

    def _complete(self) -> None:
        self._body = b"".join(self._chunks)
        self._chunks = []
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _abandon(self) -> None:
        self._lost = True
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


def _too_large(limit: int) -> BodyError:
    return BodyError(413, "body_too_large", f"body is over the {limit}-byte limit")


Handler = Callable[[Request], Awaitable[Reply]]


class Limits:
    def __init__(self, max_body: int, header_timeout_s: float) -> None:
        self.max_body = max_body
        self.header_timeout_s = header_timeout_s


class ServerConnection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered one at a time in
    order (pipelining allowed)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[Request] = collections.deque()  # headers complete
        self.parsing: Request | None = None
        self.busy = False
        self.closing = False
        self.deadline: asyncio.TimerHandle | None = None
        self._header: list[tuple[str, str]] = []
        self._url = b""
        self.writable = asyncio.Event()  # False while the client's socket buffer is full
        self.writable.set()

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._expect_headers()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "upgrade_unsupported", "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            log.info("refused a malformed request: %s", exc)
            self._refuse(400, "bad_request", f"not an HTTP/1.1 request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.writable.set()  # a body being streamed here stops at its next chunk
        self.server.connections.discard(self)
        self.server.changed.set()
        self._cancel_deadline()
        if self.parsing is not None:
            self.parsing._abandon()
        for request in self.queue:
            if not request.body_complete:
                request._abandon()

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = Request(self)
        self._header = []
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        request = self.parsing
        assert request is not None
        request.headers = CIMultiDict(self._header)
        request.method = self.parser.get_method().decode("ascii")
        request.raw_path = self._url.decode("latin-1")
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        length = request.headers.get("Content-Length")
        request.content_length = int(length) if length and length.isdigit() else None
        request.chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                self.queue.append(request)
                request._continue = False
                self._reply_now(request, 417, "expectation_failed",
                                "only Expect: 100-continue is understood")  # fmt: skip
                return
            request._continue = request.version == "1.1"
        if not request.body_exists:
            request._body = b""
        self.queue.append(request)
        if len(self.queue) > 8 and self.transport is not None:
            self.transport.pause_reading()  # pipelined too far ahead: wait for the answers
        self._next()

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing._add(body, self.limits.max_body)

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        if request is not None:
            request._complete()

    # -- answering ----------------------------------------------------------------------------
    def _next(self) -> None:
        if self.busy or not self.queue or self.closing:
            return
        self.busy = True
        self.loop.create_task(self._serve(self.queue[0]))

    async def _serve(self, request: Request) -> None:
        try:
            response = await self.handler(request)
            if isinstance(response.body, BodyStream):
                await self._send_stream(request, response)
                return
        except BodyError as exc:
            response = error_reply(exc.status, exc.code, exc.message, close=True)
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_reply(500, "internal", type(exc).__name__, close=True)
        self._send(request, response)

    def _reply_now(self, request: Request, status: int, code: str, message: str) -> None:
        if not self.busy and self.queue and self.queue[0] is request:
            self.busy = True
            self._send(request, error_reply(status, code, message, close=True))

    def _send(self, request: Request, response: Reply) -> None:
        self._answered(request)
        status, body = response.status, response.body
        close = self._closes(request, response)
        head = self._head(status, response.headers, close)
        if status not in _NO_BODY:
            head.insert(-1, b"Content-Length: %d\r\n" % len(body))  # type: ignore[arg-type]
        if request.method != "HEAD" and status not in _NO_BODY:
            head.append(body)  # type: ignore[arg-type]
        self.write(b"".join(head))
        self._after(close)

    async def _send_stream(self, request: Request, response: Reply) -> None:
        """An answer whose body is still arriving (a BodyStream): chunked to an HTTP/1.1
        client, else until the connection closes; the upstream waits while this client
        reads slowly. A body cut off upstream cuts this answer off too (the connection
        closes before its end)."""
        body = response.body
        assert isinstance(body, BodyStream)
        chunked = request.version == "1.1"
        close = self._closes(request, response) or not chunked
        head = self._head(response.status, response.headers, close)
        if chunked:
            head.insert(-1, b"Transfer-Encoding: chunked\r\n")
        self.write(b"".join(head))
        try:
            async for chunk in body:
                if self.closing:
                    raise ConnectionError("the client went away")
                if chunk and request.method != "HEAD":
                    self.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await self.writable.wait()
            if chunked:
                self.write(b"0\r\n\r\n")
        except Exception as exc:  # cut off upstream, or too late: no clean end for this one
            log.info("%s %s: the answer's body was cut off: %s", request.method, request.path, exc)
            body.discard()
            close = True
        self._answered(request)
        self._after(close)

    def _answered(self, request: Request) -> None:
        if self.queue and self.queue[0] is request:
            self.queue.popleft()
        self.busy = False
        self.server.changed.set()

    def _closes(self, request: Request, response: Reply) -> bool:
        # A body not read to its end cannot be skipped over: the connection closes.
        return (
            response.close
            or not request.keep_alive
            or not request.body_complete
            or self.closing
            or self.server.stopping
        )

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]], close: bool) -> list[bytes]:
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
                _header_lines(headers)]  # fmt: skip
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        return head

    def _after(self, close: bool) -> None:
        if close:
            self._close()
            return
        if self.transport is not None and len(self.queue) <= 8:
            self.transport.resume_reading()
        if self.queue:
            self._next()
        else:  # the next request's headers, from now (perhaps begun already)
            self._expect_headers()

    def pause_writing(self) -> None:  # the client reads slower than we write
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _refuse(self, status: int, code: str, message: str) -> None:
        if not self.busy:  # else the connection closes after the answer in progress
            self.write(_wire_error(status, code, message))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.close()

    # -- the header timeout ------------------------------------------------------------------
    def _expect_headers(self) -> None:
        self._cancel_deadline()
        self.deadline = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self.deadline = None
        if not self.busy and not self.queue:
            self._close()

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


def _header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    text = "".join([f"{name}: {value}\r\n" for name, value in headers])
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # not what HTTP allows, but said as UTF-8 rather than lost
        return text.encode("utf-8")


def error_reply(status: int, code: str, message: str, close: bool = False) -> Reply:
    """The sidecar's error shape (errors.error, which imports this module)."""
    reply = json_reply({"error": {"code": code, "message": message}}, status)
    reply.close = close
    return reply


def _wire_error(status: int, code: str, message: str) -> bytes:
    """An error answer as bytes, for a connection with no request to answer (then closed)."""
    reply = error_reply(status, code, message)
    assert isinstance(reply.body, bytes)
    head = ServerConnection._head(status, reply.headers, close=True)
    head.insert(-1, b"Content-Length: %d\r\n" % len(reply.body))
    return b"".join([*head, reply.body])


class Server:
    """A listening socket and its connections."""

    def __init__(self, handler: Handler, limits: Limits) -> None:
        self.handler = handler
        self.limits = limits
        self.connections: set[ServerConnection] = set()
        self.stopping = False
        self.changed = asyncio.Event()  # a connection answered, or closed
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; the port it listens on."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ServerConnection(self), host, port, reuse_address=True, backlog=1024
        )
        return int(self.server.sockets[0].getsockname()[1])

    def idle(self) -> bool:
        return not any(c.busy or c.queue for c in self.connections)

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let the requests in progress finish (within `grace_s`), close."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        for conn in [c for c in self.connections if not c.busy and not c.queue]:
            conn._close()
        while not self.idle() and loop.time() < until:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), until - loop.time())
        for conn in list(self.connections):
            conn._close()


# -- the upstream client ---------------------------------------------------------------------


class UpstreamError(Exception):
    """No answer: ("timeout" | "unreachable", message). `sent`: whether the request may
    have reached the upstream (False: no connection was made, so it never did)."""

    def __init__(self, code: str, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.sent = sent


class _Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []


STREAM_OVER = 64 * 1024  # an answer bigger than this, or of unknown length, may be streamed
_HIGH_WATER = 1 << 20  # bytes of a streamed body held here before the upstream is paused


class BodyStream:
    """The body of an answer still arriving: iterate to get its chunks as they come (the
    upstream is paused while more than _HIGH_WATER bytes wait here). The connection goes
    back to its pool once the body is read to its end, or is closed if it is not."""

    def __init__(self, conn: ClientConnection, release: Callable[[bool], None]) -> None:
        self.conn = conn
        self.release = release
        self.chunks: collections.deque[bytes] = collections.deque()
        self.held = 0
        self.finished = False  # the whole body arrived
        self.error: Exception | None = None
        self.wake = asyncio.Event()
        self.reusable = False

    # fed by the connection
    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.held += len(chunk)
        if self.held > _HIGH_WATER and self.conn.transport is not None:
            self.conn.transport.pause_reading()
        self.wake.set()

    def finish(self, reusable: bool) -> None:
        self.finished, self.reusable = True, reusable
        self.wake.set()

    def fail(self, exc: Exception) -> None:
        if not self.finished:
            self.error = exc
            self.wake.set()

    # read by the server
    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        while not self.chunks:
            if self.error is not None:
                self.release(False)
                raise self.error
            if self.finished:
                self.release(self.reusable)
                raise StopAsyncIteration
            self.wake.clear()
            await self.wake.wait()
        chunk = self.chunks.popleft()
        self.held -= len(chunk)
        if self.held <= _HIGH_WATER // 2 and self.conn.transport is not None:
            self.conn.transport.resume_reading()
        return chunk

    def discard(self) -> None:
        """Not to be read (the call is tried again): the connection is closed."""
        self.release(False)


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream; one request on it at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.done: asyncio.Future[bool] | None = None  # True: the connection may be reused
        self.closed = False
        self.received = False  # any byte of the answer
        self.headers_done = False
        self.until_close = False  # a body that ends when the connection does
        self.framed = False  # the answer has a Content-Length or Transfer-Encoding
        self.head = False  # the request was HEAD: its answer has no body, whatever it says
        self.idle_since = 0.0
        self.length: int | None = None  # the answer's Content-Length (None: unknown)
        self.may_stream: Callable[[bool], None] | None = None  # release, when it may stream
        self.stream: BodyStream | None = None
        self.exchange: asyncio.Future[bool] | None = None  # the exchange not yet released

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("unreachable", f"not an HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is not None:
            if self.headers_done and self.until_close:
                self.stream.finish(False)
            else:
                self.stream.fail(UpstreamError("unreachable", "the answer's body was cut off"))
        if self.done is not None and not self.done.done():
            if self.headers_done and self.until_close:
                self.done.set_result(False)
            else:
                why = str(exc) if exc else "the connection closed before the answer"
                self.done.set_exception(UpstreamError("unreachable", why))

    def on_message_begin(self) -> None:
        if self.answer is None:
            self.answer = _Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.answer is not None:
            self.answer.headers.append((name.decode("latin-1"), value.decode("latin-1")))
            if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
                self.framed = True
                if len(name) == 14 and value.isdigit():
                    self.length = int(value)  # else chunked: of unknown length

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.answer is None:
            return
        self.answer.status = self.parser.get_status_code()
        self.until_close = not self.framed
        # HEAD: the parser would wait for the body it announces. Done, and not reused.
        if self.head and self.answer.status >= 200 and self.done and not self.done.done():
            self.done.set_result(False)
            return
        # A big body, or one of unknown length: handed on as it arrives, not held whole.
        big = self.length is None or self.length > STREAM_OVER
        if self.may_stream is not None and self.answer.status >= 200 and big:
            self.stream = BodyStream(self, self.may_stream)
            if self.done and not self.done.done():
                self.done.set_result(False)

    def on_body(self, body: bytes) -> None:
        if self.stream is not None:
            self.stream.feed(body)
        elif self.answer is not None:
            self.answer.body.append(body)

    def on_message_complete(self) -> None:
        if self.stream is not None:
            self.stream.finish(self.parser.should_keep_alive())
            return
        if self.done is not None and not self.done.done():
            if self.answer is not None and 100 <= self.answer.status < 200:
                self.answer, self.headers_done, self.framed = _Answer(), False, False  # interim
                return
            self.done.set_result(self.parser.should_keep_alive())

    def _fail(self, exc: Exception) -> None:
        if self.stream is not None:
            self.stream.fail(exc)
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


IDLE_S = 30.0  # an idle upstream connection older than this is not reused
MAX_IDLE = 128  # idle connections kept per upstream


class Upstream:
    """A pool of keep-alive connections to one host:port."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.authority = f"{host}:{port}".encode("latin-1")
        self.idle: list[ClientConnection] = []

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | Any,
        body: bytes,
        timeout_s: float,
        replayable: bool = True,
        stream: bool = False,
    ) -> tuple[int, list[tuple[str, str]], bytes | BodyStream]:
        """(status, headers, body). UpstreamError when there is no answer. `replayable`:
        the request may be sent again on a fresh connection when a reused one turns out
        closed before any byte of the answer came (the upstream dropped it while idle).
        `stream`: a body over STREAM_OVER bytes, or of unknown length, comes as a
        BodyStream (within the same timeout, counted to its end)."""
        head = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode("ascii"), target.encode("latin-1"), self.authority),
            _header_lines(headers.items() if hasattr(headers, "items") else headers)]  # fmt: skip
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        if body:
            head.append(body)
        data = b"".join(head)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            conn, reused = await self._connection(deadline, timeout_s)
            conn.head = method == "HEAD"
            try:
                return await self._exchange(conn, data, deadline, timeout_s, stream)
            except UpstreamError as exc:
                if exc.code != "timeout" and reused and not conn.received and replayable:
                    continue  # closed while idle: once more, on another connection
                raise

    async def _connection(self, deadline: float, timeout_s: float) -> tuple[ClientConnection, bool]:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(ClientConnection, self.host, self.port)
        except TimeoutError:
            raise UpstreamError("timeout", f"no answer within {timeout_s:g}s", sent=False) from None
        except OSError as exc:
            raise UpstreamError(
                "unreachable", f"Cannot connect to host {self.host}:{self.port} ({exc})", sent=False
            ) from None
        return conn, False

    async def _exchange(
        self, conn: ClientConnection, data: bytes, deadline: float, timeout_s: float,
        stream: bool = False,
    ) -> tuple[int, list[tuple[str, str]], bytes | BodyStream]:  # fmt: skip
        assert conn.transport is not None
        loop = asyncio.get_running_loop()
        conn.answer = _Answer()
        conn.received = conn.headers_done = conn.until_close = conn.framed = False
        conn.length, conn.stream = None, None
        done = conn.done = conn.exchange = loop.create_future()
        # A timer rather than asyncio.timeout: one handle, the cheapest way on this path.
        timer = loop.call_at(deadline, _time_out, conn, timeout_s)

        def release(reusable: bool) -> None:  # the exchange is over, its body read or not
            if conn.exchange is not done:
                return  # released already
            conn.exchange = None
            timer.cancel()
            conn.stream = None
            if reusable and not conn.closed and len(self.idle) < MAX_IDLE:
                conn.idle_since = time.monotonic()
                self.idle.append(conn)
            else:
                conn.close()

        conn.may_stream = release if stream else None
        try:
            conn.transport.write(data)
            reusable = await done
        except BaseException:
            timer.cancel()
            conn.close()  # half-way through an exchange: never reused
            raise
        answer, conn.answer, conn.done = conn.answer, None, None
        assert answer is not None
        if conn.stream is not None:  # released when the stream is read to its end
            return answer.status, answer.headers, conn.stream
        release(reusable)
        return answer.status, answer.headers, b"".join(answer.body)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def _time_out(conn: ClientConnection, timeout_s: float) -> None:
    late = UpstreamError("timeout", f"no answer within {timeout_s:g}s")
    if conn.stream is not None:  # the body is late: what was handed on stays cut off
        conn.stream.fail(late)
        conn.close()
    elif conn.done is not None and not conn.done.done():
        conn.done.set_exception(late)


class Pool:
    """Upstreams by host:port (bounded: the least recently made go first)."""

    def __init__(self, limit: int = 1024) -> None:
        self.upstreams: dict[tuple[str, int], Upstream] = {}
        self.limit = limit

    def get(self, host: str, port: int) -> Upstream:
        key = (host, port)
        upstream = self.upstreams.get(key)
        if upstream is None:
            if len(self.upstreams) >= self.limit:
                self.upstreams.pop(next(iter(self.upstreams))).close()
            upstream = self.upstreams[key] = Upstream(host, port)
        return upstream

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
        self.upstreams.clear()
